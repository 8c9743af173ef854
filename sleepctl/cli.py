"""The `sleepctl` command: a thin layer over the Python API.

Data goes to stdout (a rich table, or JSON with --json); progress, hints and errors to stderr.
Exit codes: 0 ok, 1 runtime error, 2 usage or recipe error, 75 another run holds the lock, 130 interrupted.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import __version__
from .errors import EXIT_INTERRUPTED, EXIT_USAGE, SleepError, UsageError

app = typer.Typer(
    help="A sleep cycle for LLM agents: record memories by day, consolidate them into LoRA adapters at night.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
adapters_app = typer.Typer(help="List adapter versions, roll back, or pick the current one.", no_args_is_help=True)
probe_app = typer.Typer(help="Add your own probes (question + reference answer) to a memory.", no_args_is_help=True)
recipes_app = typer.Typer(help="List, show and validate recipes.", no_args_is_help=True)
app.add_typer(adapters_app, name="adapters")
app.add_typer(probe_app, name="probe")
app.add_typer(recipes_app, name="recipes")

out = Console()
err = Console(stderr=True, soft_wrap=True)

HomeOpt = typer.Option(
    None,
    "--home",
    envvar="SLEEPCTL_HOME",
    help="The agent's home folder (default: ~/.local/share/sleepctl/default).",
    show_envvar=True,
)
JsonOpt = typer.Option(False, "--json", help="Print JSON for scripts.")
RecipeOpt = typer.Option(None, "--recipe", "-r", help="A bundled recipe name or a YAML file (default: quick-cpu).")
SetOpt = typer.Option([], "--set", help="Override a recipe key, e.g. --set loss.lmbda=0.3 (repeatable).")


def emit(data: Any, as_json: bool, human=None) -> None:
    if as_json:
        if isinstance(data, BaseModel):
            data = data.model_dump(mode="json")
        elif isinstance(data, list):
            data = [d.model_dump(mode="json") if isinstance(d, BaseModel) else d for d in data]
        out.print_json(json.dumps(data, default=str))
    elif human is not None:
        human(data)


def _version(v: bool) -> None:
    if v:
        out.print(f"sleepctl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version."),
) -> None:
    pass


# --- record and read ----------------------------------------------------------------------------------


@app.command()
def record(
    files: list[str] = typer.Argument(
        None, help="Files to record: .jsonl (chat or text records), .md/.txt notes; '-' for stdin."
    ),
    text: str | None = typer.Option(None, "--text", "-t", help="Record this text as one note."),
    fmt: str = typer.Option("auto", "--format", "-f", help="auto, chat, text or note."),
    split: str | None = typer.Option(None, "--split", help="Split notes on lines equal to this separator, e.g. '---'."),
    tag: list[str] = typer.Option([], "--tag", help="Tag every recorded memory (repeatable)."),
    no_redact: bool = typer.Option(
        False, "--no-redact", help="Store credentials as they are. Anything consolidated cannot be taken back."
    ),
    max_bytes: int = typer.Option(1_000_000, "--max-bytes", help="Refuse a memory larger than this."),
    home: str | None = HomeOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Record memories (traces) into the home; duplicates are skipped, credentials redacted."""
    from .memories import record as api_record

    if fmt not in ("auto", "chat", "text", "note"):
        raise UsageError(f"unknown --format {fmt!r}: use auto, chat, text or note")
    if not files and text is None:
        raise UsageError("nothing to record: give files, '-' for stdin, or --text")
    res = api_record(
        files or [], text=text, home=home, fmt=fmt, separator=split, tags=tag, redact=not no_redact, max_bytes=max_bytes
    )

    def human(r) -> None:
        out.print(f"recorded [bold]{len(r.added)}[/bold] memories, {r.probes_added} probes into {r.home}")
        if r.duplicates:
            err.print(
                f"[yellow]skipped {len(r.duplicates)} duplicate(s):[/yellow] {', '.join(r.duplicates[:5])}{' …' if len(r.duplicates) > 5 else ''}"
            )
        if r.redactions:
            err.print(
                f"[yellow]redacted {r.redactions} credential(s)[/yellow] before storing (--no-redact turns this off)"
            )

    emit(res, as_json, human)


@app.command("list")
def list_cmd(
    status: str | None = typer.Option(None, "--status", help="pending or consolidated"),
    since: str | None = typer.Option(None, "--since", help="Only memories recorded at or after this ISO date."),
    home: str | None = HomeOpt,
    as_json: bool = JsonOpt,
) -> None:
    """List stored memories."""
    from .memories import list_memories

    traces = list_memories(home, status, since)

    def human(ts) -> None:
        t = Table(title=f"{len(ts)} memories")
        for c in ("id", "kind", "status", "created", "tags", "text"):
            t.add_column(
                c,
                overflow="fold" if c == "text" else "ellipsis",
                no_wrap=c != "text",
                min_width=20 if c == "id" else None,
            )
        for x in ts:
            t.add_row(
                x.id,
                x.kind,
                x.status + (f" ({x.adapter_id})" if x.adapter_id else ""),
                x.created_at[:19],
                ",".join(x.tags),
                x.text[:80].replace("\n", " "),
            )
        out.print(t)

    emit(traces, as_json, human)


@app.command()
def show(
    memory: str = typer.Argument(..., help="A memory id (or a unique prefix of its id or hash)."),
    home: str | None = HomeOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Show one memory and its probes."""
    from .memories import show_memory

    t, probes = show_memory(memory, home)

    def human(_) -> None:
        out.print(f"[bold]{t.id}[/bold]  {t.kind}  {t.status}  source={t.source}  redactions={t.redactions}")
        out.print(t.text)
        for p in probes:
            out.print(f"  [{p.origin}/{p.split}] {p.question} → {p.answer}")

    emit({"memory": t.model_dump(), "probes": [p.model_dump() for p in probes]}, as_json, human)


@probe_app.command("add")
def probe_add(
    memory: str,
    question: str = typer.Option(..., "--question", "-q"),
    answer: str = typer.Option(..., "--answer", "-a"),
    home: str | None = HomeOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Add a user probe to a memory; user probes are always held out from training."""
    from .memories import add_probe

    p = add_probe(memory, question, answer, home)
    emit(p, as_json, lambda p: out.print(f"added probe {p.id} to {p.trace_id}"))


@app.command()
def status(home: str | None = HomeOpt, as_json: bool = JsonOpt) -> None:
    """Counts of memories, probes, runs and adapters, and the current adapter."""
    from .memories import open_store

    with open_store(home) as st:
        data = st.counts() | {"home": str(st.path.parent), "current_adapter": st.current_adapter_id()}
    emit(data, as_json, lambda d: out.print(" ".join(f"{k}={v}" for k, v in d.items())))


# --- seed, adapters, runs --------------------------------------------------------------------------------


@app.command()
def seed(
    teacher: str | None = typer.Option(
        None, "--teacher", help="A recipe profile (small, large), 'self', or a model name."
    ),
    student: str | None = typer.Option(None, "--student", help="A recipe profile or a model name."),
    recipe: str | None = RecipeOpt,
    since: str | None = typer.Option(None, "--since", help="Only pending memories recorded at or after this ISO date."),
    steps: int | None = typer.Option(None, "--steps", help="Override training.max_steps."),
    overrides: list[str] = SetOpt,
    home: str | None = HomeOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Consolidate pending memories into a new LoRA adapter (Knowledge Seeding)."""
    from .recipe import parse_overrides
    from .seed import seed as api_seed

    ov = parse_overrides(overrides)
    if steps is not None:
        ov["training.max_steps"] = steps
    res = api_seed(
        recipe, home=home, teacher=teacher, student=student, since=since, overrides=ov, show_progress=not as_json
    )

    def human(r) -> None:
        out.print(r.message)
        if r.run_id:
            out.print(f"run {r.run_id}  ({r.wall_s:.0f} s, peak {r.peak_memory_mb:.0f} MiB)  folder {r.run_dir}")

    emit(res, as_json, human)


@app.command()
def dream(
    recipe: str | None = RecipeOpt,
    max_minutes: float | None = typer.Option(None, "--max-minutes", help="Stop cleanly after this many minutes."),
    max_dreams: int | None = typer.Option(None, "--max-dreams", help="Write at most this many dreams."),
    overrides: list[str] = SetOpt,
    home: str | None = HomeOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Rehearse recent memories on self-written dreams (ReST-EM); safe to run nightly from cron."""
    from .dream import dream as api_dream
    from .recipe import parse_overrides

    if max_minutes is not None and max_minutes <= 0:
        raise UsageError("--max-minutes must be positive")
    if max_dreams is not None and max_dreams < 1:
        raise UsageError("--max-dreams must be at least 1")
    res = api_dream(
        recipe,
        home=home,
        max_minutes=max_minutes,
        max_dreams=max_dreams,
        overrides=parse_overrides(overrides),
        show_progress=not as_json,
    )
    emit(res, as_json, lambda r: out.print(r.message))
    if res.exit_code:
        raise typer.Exit(res.exit_code)


@app.command()
def consolidate(
    recipe: str | None = typer.Option(
        None, "--recipe", "-r", help="A recipe name or YAML file (default: the recipe of the current adapter's run)."
    ),
    if_needed: bool = typer.Option(
        False, "--if-needed", help="Only when the stack holds more than consolidate.max_adapters (for cron)."
    ),
    overrides: list[str] = SetOpt,
    home: str | None = HomeOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Distil every memory of the current adapter stack into one fresh adapter; current only if nothing got worse."""
    from .consolidate import consolidate as api_consolidate
    from .recipe import parse_overrides

    res = api_consolidate(
        recipe, home=home, if_needed=if_needed, overrides=parse_overrides(overrides), show_progress=not as_json
    )

    def human(r) -> None:
        out.print(escape(r.message))
        for g, v in r.after.get("recall", {}).items():
            b = r.before["recall"].get(g)
            out.print(f"  held-out recall of {g}'s memories: {_pct(b)} -> {_pct(v)}")
        if r.after:
            out.print(f"  general perplexity: {r.before['ppl']:.2f} -> {r.after['ppl']:.2f}")

    emit(res, as_json, human)
    if res.exit_code:
        raise typer.Exit(res.exit_code)


@adapters_app.command("list")
def adapters_list(home: str | None = HomeOpt, as_json: bool = JsonOpt) -> None:
    """Adapter versions, newest last; * marks the current one."""
    from .memories import open_store

    with open_store(home) as st:
        ads = st.adapters()

    def human(ads) -> None:
        t = Table(title=f"{len(ads)} adapters")
        for c in ("", "version", "id", "kind", "base model", "on", "replaces", "memories", "run", "created"):
            t.add_column(c, no_wrap=c in ("id", "run"))
        version = {a.id: f"v{a.version}" for a in ads}
        for a in ads:
            t.add_row(
                "*" if a.current else "",
                f"v{a.version}",
                a.id,
                a.kind,
                escape(a.base_model),
                version.get(a.parent_id, a.parent_id or "base"),
                version.get(a.replaces, a.replaces or "-"),
                str(len(a.trace_ids)),
                a.run_id,
                a.created_at[:19],
            )
        out.print(t)

    emit(ads, as_json, human)


@adapters_app.command("prune")
def adapters_prune(
    yes: bool = typer.Option(False, "--yes", "-y", help="Delete without asking."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only list what would be deleted."),
    home: str | None = HomeOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Delete adapters outside the current lineage (replaced by a consolidation, rolled back, not kept)."""
    from .adapters import prunable, prune
    from .memories import open_store

    with open_store(home) as st:
        cands = prunable(st)
        if not cands:
            emit(
                {"pruned": []},
                as_json,
                lambda _: out.print("nothing to prune: every adapter is in the current lineage"),
            )
            return
        listing = ", ".join(f"v{a.version} ({a.kind})" for a in cands)
        if dry_run:
            emit(
                {"would_prune": [a.model_dump() for a in cands]},
                as_json,
                lambda _: out.print(f"would delete {listing}"),
            )
            return
        if not yes:
            if not sys.stdin.isatty():
                raise UsageError(f"would delete {listing}; pass --yes to confirm (no terminal to ask on)")
            if not typer.confirm(f"delete {listing}?"):
                raise typer.Exit(1)
        done = prune(st, [a.id for a in cands])
    emit({"pruned": [a.model_dump() for a in done]}, as_json, lambda _: out.print(f"deleted {listing}"))


@adapters_app.command("rollback")
def adapters_rollback(
    to: str | None = typer.Argument(None, help="A version (v2), an id, or 'base'; default: the parent of the current."),
    home: str | None = HomeOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Make an earlier adapter current. Nothing is deleted; roll forward with `adapters use`."""
    _set_current(to, home, as_json)


@adapters_app.command("use")
def adapters_use(
    to: str = typer.Argument(..., help="A version (v3) or id."), home: str | None = HomeOpt, as_json: bool = JsonOpt
) -> None:
    """Make any adapter version current."""
    _set_current(to, home, as_json)


def _set_current(to: str | None, home: str | None, as_json: bool) -> None:
    from .adapters import rollback
    from .memories import open_store

    with open_store(home) as st:
        a = rollback(st, to)
    emit(
        {"current": a.model_dump() if a else None},
        as_json,
        lambda _: out.print(f"current adapter: {f'v{a.version} ({a.id})' if a else 'none (base model)'}"),
    )


@app.command()
def runs(home: str | None = HomeOpt, as_json: bool = JsonOpt) -> None:
    """Runs and their status."""
    from .memories import open_store

    with open_store(home) as st:
        rs = st.runs()

    def human(rs) -> None:
        t = Table(title=f"{len(rs)} runs")
        for c in ("id", "kind", "status", "started", "ended", "folder"):
            t.add_column(c)
        for r in rs:
            t.add_row(r.id, r.kind, r.status, r.started_at[:19], (r.ended_at or "")[:19], r.dir)
        out.print(t)

    emit(rs, as_json, human)


# --- eval ------------------------------------------------------------------------------------------------


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def print_report(r, per_memory: bool = False, samples: int = 4) -> None:
    what = f"adapter v{r.adapter_version}" if r.adapter_version else "no adapter"
    t = Table(
        title=f"eval of {what} on {r.student}: "
        f"{r.probes_new} held-out probes" + (f", {r.probes_retention} retention probes" if r.probes_retention else "")
    )
    for c in ("method", "probes", "n", "contains", "F1", "judge", "general ppl", "ppl change"):
        t.add_column(c, justify="right" if c not in ("method", "probes") else "left")
    for row in r.table():
        t.add_row(
            row["method"],
            row["group"],
            str(row["n"]),
            _pct(row["contains"]),
            f"{row['f1']:.3f}",
            _pct(row["judge"]),
            "-" if row["ppl"] is None else f"{row['ppl']:.2f}",
            "-" if row["ppl_change"] is None else f"{100 * row['ppl_change']:+.1f}%",
        )
    out.print(t)
    for m in r.methods:
        if m.method in ("sleep", "in-context") and m.group == "new" and m.results:
            out.print(f"[bold]{m.method}[/bold]: sample outputs beside their references")
            for x in m.results[:samples]:
                mark = "[green]✓[/green]" if x.contains else "[red]✗[/red]"
                out.print(
                    f"  {mark} Q: {x.question}\n     ref: {x.reference}\n     out: {x.output[:160]!r}", highlight=False
                )
    if per_memory:
        pm = Table(title="per memory (contains-match, new probes)")
        methods = [m for m in r.methods if m.group == "new"]
        pm.add_column("memory")
        for m in methods:
            pm.add_column(m.method)
        ids = sorted({x.trace_id for m in methods for x in m.results})
        for tid in ids:
            cells = []
            for m in methods:
                xs = [x for x in m.results if x.trace_id == tid]
                cells.append(f"{sum(x.contains for x in xs)}/{len(xs)}")
            pm.add_row(tid, *cells)
        out.print(pm)
    for n in r.notes:
        err.print(f"[dim]note: {n}[/dim]")
    if r.path:
        err.print(f"[dim]report: {r.path} (plot beside it: eval.png)[/dim]")


@app.command("eval")
def eval_cmd(
    target: str | None = typer.Argument(
        None, help="A run id, an adapter (v2 or id), or 'base'; default: the current adapter."
    ),
    baselines: bool = typer.Option(
        False, "--baselines", help="Also train and score naive SFT on the raw traces at the same budget."
    ),
    per_memory: bool = typer.Option(False, "--per-memory", help="Show recall per memory."),
    compare: tuple[str, str] | None = typer.Option(
        None, "--compare", help="Two runs or adapters to put side by side: --compare A B (reads their saved reports)."
    ),
    recipe: str | None = RecipeOpt,
    student: str | None = typer.Option(
        None, "--student", help="Override the student model (must match the adapter's base)."
    ),
    overrides: list[str] = SetOpt,
    home: str | None = HomeOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Recall on held-out probes (base, in-context, sleep [, naive SFT]) and forgetting (perplexity, retention)."""
    from .evaluate import compare_reports, evaluate
    from .recipe import parse_overrides

    if compare and any(compare):
        rows = compare_reports(compare[0], compare[1], home=home)

        def human(rows) -> None:
            t = Table(title=f"{compare[0]}  vs  {compare[1]}")
            for c in ("method", "probes", "A contains", "B contains", "A F1", "B F1", "A ppl", "B ppl"):
                t.add_column(c)
            for x in rows:
                t.add_row(
                    x["method"],
                    x["group"],
                    _pct(x["a_contains"]),
                    _pct(x["b_contains"]),
                    "-" if x["a_f1"] is None else f"{x['a_f1']:.3f}",
                    "-" if x["b_f1"] is None else f"{x['b_f1']:.3f}",
                    "-" if x["a_ppl"] is None else f"{x['a_ppl']:.2f}",
                    "-" if x["b_ppl"] is None else f"{x['b_ppl']:.2f}",
                )
            out.print(t)

        emit(rows, as_json, human)
        return
    r = evaluate(
        target, home=home, recipe=recipe, student=student, baselines=baselines, overrides=parse_overrides(overrides)
    )
    emit(r, as_json, lambda r: print_report(r, per_memory))


# --- recipes ---------------------------------------------------------------------------------------------


@recipes_app.command("list")
def recipes_list(as_json: bool = JsonOpt) -> None:
    """Bundled recipes."""
    from .recipe import RECIPES_DIR, load_recipe

    rows = []
    for p in sorted(RECIPES_DIR.glob("*.yaml")):
        r, _ = load_recipe(p)
        rows.append(
            {
                "name": p.stem,
                "teacher": r.teacher,
                "student": r.student,
                "profiles": {k: v.model for k, v in r.profiles.items()},
                "description": r.description,
            }
        )
    emit(
        rows,
        as_json,
        lambda rows: [
            out.print(
                f"[bold]{x['name']}[/bold]: {x['description']}  (teacher {x['teacher']} → student {x['student']}; {x['profiles']})"
            )
            for x in rows
        ],
    )


@recipes_app.command("show")
def recipes_show(
    recipe: str = typer.Argument("quick-cpu"), overrides: list[str] = SetOpt, as_json: bool = JsonOpt
) -> None:
    """Validate a recipe and print it resolved, with every default filled in."""
    import yaml

    from .recipe import load_recipe, parse_overrides

    r, path = load_recipe(recipe, parse_overrides(overrides))
    emit(r.model_dump(), as_json, lambda d: out.print(f"# {path}\n" + yaml.safe_dump(d, sort_keys=False)))


def main() -> None:
    debug = os.environ.get("SLEEPCTL_DEBUG") == "1"
    try:
        app()
    except SleepError as e:
        if debug:
            raise
        err.print(f"[red]error:[/red] {escape(str(e))}", highlight=False)  # messages may hold [brackets]
        if e.hint:
            err.print(f"[dim]hint: {escape(e.hint)}[/dim]", highlight=False)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(EXIT_INTERRUPTED)
    except (BrokenPipeError, FileNotFoundError, PermissionError, IsADirectoryError) as e:
        if debug:
            raise
        err.print(f"[red]error:[/red] {escape(str(e))}")
        sys.exit(EXIT_USAGE if isinstance(e, FileNotFoundError) else 1)


if __name__ == "__main__":
    main()
