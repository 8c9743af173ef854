"""The `sleepctl` command: a thin layer over the Python API.

Data goes to stdout (a rich table, or JSON with --json); progress, hints and errors to stderr.
Exit codes: 0 ok, 1 runtime error, 2 usage or recipe error, 75 another run holds the lock, 130 interrupted.
Every failure is one line on stderr (`error_line`); an unexpected exception is a bug, and says so in that line:
SLEEPCTL_DEBUG=1 shows its traceback. Stored content is printed through `display`, never as markup.
"""

from __future__ import annotations

import errno
import json
import math
import os
import sqlite3
import sys
from typing import Any

import typer
from pydantic import BaseModel
from rich import box
from rich.console import Console
from rich.table import Table

from . import __version__
from .display import line, one_line, plain, safe
from .errors import EXIT_INTERRUPTED, EXIT_RUNTIME, EXIT_USAGE, SleepError, UsageError

HELP = {"help_option_names": ["-h", "--help"]}
app = typer.Typer(
    help="A sleep cycle for LLM agents: record memories by day, consolidate them into LoRA adapters at night.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings=HELP,  # --install-completion / --show-completion for bash, zsh, fish
)
adapters_app = typer.Typer(
    help="List adapter versions, roll back, or pick the current one.", no_args_is_help=True, context_settings=HELP
)
probe_app = typer.Typer(
    help="Add your own probes (question + reference answer) to a memory.", no_args_is_help=True, context_settings=HELP
)
recipes_app = typer.Typer(help="List, show and validate recipes.", no_args_is_help=True, context_settings=HELP)
app.add_typer(adapters_app, name="adapters")
app.add_typer(probe_app, name="probe")
app.add_typer(recipes_app, name="recipes")

out = Console()
err = Console(stderr=True, soft_wrap=True)
_home_arg: str | None = None  # this invocation's --home, so a database error can name the file


def _note_home(value: str | None) -> str | None:
    global _home_arg
    _home_arg = value
    return value


HomeOpt = typer.Option(
    None,
    "--home",
    envvar="SLEEPCTL_HOME",
    help="The agent's home folder (default: ~/.local/share/sleepctl/default).",
    show_envvar=True,
    callback=_note_home,
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
        out.print_json(json.dumps(data, default=str), ensure_ascii=True)  # no raw control or bidi characters
    elif human is not None:
        human(data)


def _utf8_arg(value: str, flag: str) -> str:
    """An argument that is not UTF-8 reaches Python as lone surrogates (PEP 383): refused before anything is stored."""
    try:
        value.encode()
    except UnicodeEncodeError as e:
        c = ord(value[e.start])
        what = f"byte 0x{c - 0xDC00:02x}" if 0xDC80 <= c <= 0xDCFF else f"lone surrogate \\u{c:04x}"
        raise UsageError(
            f"{flag}: not UTF-8 ({what} at character {e.start + 1}); nothing was stored",
            hint="pass UTF-8 text, e.g. through iconv -t UTF-8",
        ) from None
    return value


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
        None,
        help="Files to record: .jsonl/.json (sleepctl's records, or OpenAI, Anthropic, LangChain, Claude Code, mem0,"
        " Letta logs), .md/.txt notes; '-' for stdin.",
    ),
    text: str | None = typer.Option(None, "--text", "-t", help="Record this text as one note."),
    fmt: str = typer.Option(
        "auto",
        "--format",
        "-f",
        help="auto, chat, text, note, openai, responses, anthropic, langchain, claude-code, mem0 or letta.",
    ),
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
    from .importers import FOREIGN, FORMATS, describe
    from .memories import record as api_record

    if fmt not in FORMATS:
        raise UsageError(f"unknown --format {fmt!r}: use {', '.join(FORMATS)}")
    if not files and text is None:
        raise UsageError("nothing to record: give files, '-' for stdin, or --text")
    if max_bytes < 1:
        raise UsageError("--max-bytes must be at least 1")
    text = None if text is None else _utf8_arg(text, "--text")
    tag = [_utf8_arg(x, "--tag") for x in tag]
    split = None if split is None else _utf8_arg(split, "--split")
    res = api_record(
        files or [], text=text, home=home, fmt=fmt, separator=split, tags=tag, redact=not no_redact, max_bytes=max_bytes
    )

    def human(r) -> None:
        out.print(line("recorded ", (len(r.added), "bold"), f" memories, {r.probes_added} probes into {r.home}"))
        if r.duplicates:
            more = " …" if len(r.duplicates) > 5 else ""
            skipped = (f"skipped {len(r.duplicates)} duplicate(s):", "yellow")
            err.print(line(skipped, f" {', '.join(r.duplicates[:5])}{more}"))
        if r.redactions:
            redacted = (f"redacted {r.redactions} credential(s)", "yellow")
            err.print(line(redacted, " before storing (--no-redact turns this off)"))
        if set(r.formats) & set(FOREIGN.values()) or r.skipped:
            read = ", ".join(f"{k} ({n})" for k, n in r.formats.items())
            left = f"; left out of the memory text: {describe(r.skipped)}" if r.skipped else ""
            if r.skipped.get("system prompt"):
                left += " (system prompts are kept beside their memory: sleepctl show ID)"
            err.print(line(f"read as {read}{left}"))

    emit(res, as_json, human)


@app.command("list")
def list_cmd(
    status: str | None = typer.Option(None, "--status", help="pending or consolidated"),
    since: str | None = typer.Option(
        None, "--since", help="Only memories recorded since: an ISO date or time, today, yesterday, or an age (3d)."
    ),
    home: str | None = HomeOpt,
    as_json: bool = JsonOpt,
) -> None:
    """List stored memories."""
    from .memories import list_memories

    traces = list_memories(home, status, since)

    def human(ts) -> None:
        t = Table(title=f"{len(ts)} memories", expand=True)  # every cell below is plain text, not markup
        for c in ("id", "kind", "status", "created", "tags", "text"):
            # one line per memory: the id whole (it is what `show` takes), the text cut with an ellipsis
            t.add_column(
                c,
                overflow="ellipsis",
                no_wrap=True,
                min_width={"id": 20, "text": 16}.get(c),
                ratio=1 if c == "text" else None,  # the text takes what the other columns leave
            )
        for x in ts:
            t.add_row(
                plain(x.id),
                plain(x.kind),
                plain(x.status + (f" ({x.adapter_id})" if x.adapter_id else "")),
                plain(x.created_at[:16].replace("T", " ")),
                plain(",".join(x.tags)),
                plain(x.text[:120].replace("\n", " ")),
            )
        out.print(t)

    emit(traces, as_json, human)
    if not as_json:
        _forgotten_note(home)


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
        out.print(line((t.id, "bold"), f"  {t.kind}  {t.status}  source={t.source}  redactions={t.redactions}"))
        out.print(plain(t.text, multiline=True))
        if t.system:
            out.print(line(("system prompt (not part of the memory):", "dim")))
            out.print(plain(t.system, multiline=True))
        for p in probes:
            out.print(line(f"  [{p.origin}/{p.split}] {p.question} → {p.answer}"))

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

    memory, question = _utf8_arg(memory, "MEMORY"), _utf8_arg(question, "--question")
    answer = _utf8_arg(answer, "--answer")
    p = add_probe(memory, question, answer, home)
    emit(p, as_json, lambda p: out.print(line(f"added probe {p.id} to {p.trace_id}")))


@app.command()
def status(home: str | None = HomeOpt, as_json: bool = JsonOpt) -> None:
    """Counts of memories, probes, runs and adapters, and the current adapter."""
    from .memories import open_store

    with open_store(home, readonly=True) as st:
        data = st.counts() | {"home": str(st.path.parent), "current_adapter": st.current_adapter_id()}
    emit(data, as_json, lambda d: out.print(line(" ".join(f"{k}={v}" for k, v in d.items()))))


# --- credentials already stored ----------------------------------------------------------------------------


@app.command()
def scan(home: str | None = HomeOpt, as_json: bool = JsonOpt) -> None:
    """Report what the home holds that today's redaction rules would redact (counts only, never the secrets)."""
    from .scrub import scan as api_scan

    emit(api_scan(home), as_json, _print_scan)


@app.command("redact")
def redact_cmd(
    apply: bool = typer.Option(False, "--apply", help="Rewrite it; without --apply, only say what would change."),
    home: str | None = HomeOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Redact credentials already stored: memories, probes, teacher data, run files (not the weights)."""
    from .scrub import redact_home

    emit(redact_home(home, apply=apply), as_json, _print_scan)


def _print_scan(r) -> None:
    out.print(plain(r.message))
    if r.total:
        t = Table(title="by kind")
        t.add_column("kind")
        t.add_column("found", justify="right")
        for k, n in r.by_kind.items():
            t.add_row(plain(k), plain(n))
        out.print(t)
        t = Table(title="where")
        for c in ("place", "ref", "field", "kinds"):
            t.add_column(c)
        for f in r.findings[:50]:
            t.add_row(*map(plain, (f.place, f.ref, f.field, ", ".join(f"{k} {n}" for k, n in f.kinds.items()))))
        out.print(t)
        if len(r.findings) > 50:
            err.print(plain(f"… and {len(r.findings) - 50} more places (--json lists them all)", "dim"))
    for s in r.skipped:
        err.print(plain(f"not scanned: {s}", "dim"))
    if r.status == "dry-run":
        err.print(plain("nothing was changed; sleepctl redact --apply rewrites them", "dim"))


# --- seed, adapters, runs --------------------------------------------------------------------------------


@app.command()
def seed(
    teacher: str | None = typer.Option(
        None, "--teacher", help="A recipe profile (small, large), 'self', or a model name."
    ),
    student: str | None = typer.Option(None, "--student", help="A recipe profile or a model name."),
    recipe: str | None = RecipeOpt,
    since: str | None = typer.Option(
        None, "--since", help="Only pending memories recorded since: an ISO date or time, today, yesterday, or an age."
    ),
    steps: int | None = typer.Option(None, "--steps", help="Override training.max_steps."),
    overrides: list[str] = SetOpt,
    home: str | None = HomeOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Consolidate pending memories into a new LoRA adapter (Knowledge Seeding)."""
    if steps is not None and steps < 1:
        raise UsageError("--steps must be at least 1")
    from .distributed import from_env
    from .recipe import parse_overrides
    from .seed import seed as api_seed

    ov = parse_overrides(overrides)
    if steps is not None:
        ov["training.max_steps"] = steps
    res = api_seed(
        recipe, home=home, teacher=teacher, student=student, since=since, overrides=ov, show_progress=not as_json
    )
    if not from_env().main:
        return  # under torchrun, rank 0 reports

    def human(r) -> None:
        out.print(plain(r.message))
        if r.run_id:
            out.print(line(f"run {r.run_id}  ({r.wall_s:.0f} s, peak {r.peak_memory_mb:.0f} MiB)  folder {r.run_dir}"))

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
    if max_minutes is not None and not (math.isfinite(max_minutes) and max_minutes > 0):
        raise UsageError("--max-minutes must be positive and finite (leave it out for no limit)")
    if max_dreams is not None and max_dreams < 1:
        raise UsageError("--max-dreams must be at least 1")
    from .dream import dream as api_dream  # torch: after the checks, so a bad flag fails in a blink
    from .recipe import parse_overrides

    res = api_dream(
        recipe,
        home=home,
        max_minutes=max_minutes,
        max_dreams=max_dreams,
        overrides=parse_overrides(overrides),
        show_progress=not as_json,
    )
    emit(res, as_json, lambda r: out.print(plain(r.message)))
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
        out.print(plain(r.message))
        for g, v in r.after.get("recall", {}).items():
            b = r.before["recall"].get(g)
            out.print(line(f"  held-out recall of {g}'s memories: {_pct(b)} -> {_pct(v)}"))
        if r.after:
            out.print(line(f"  general perplexity: {r.before['ppl']:.2f} -> {r.after['ppl']:.2f}"))

    emit(res, as_json, human)
    if res.exit_code:
        raise typer.Exit(res.exit_code)


@adapters_app.command("list")
def adapters_list(home: str | None = HomeOpt, as_json: bool = JsonOpt) -> None:
    """Adapter versions, newest last; * marks the current one."""
    from .memories import open_store

    with open_store(home, readonly=True) as st:
        ads = st.adapters()

    def human(ads) -> None:
        narrow = out.width < 100
        t = Table(title=f"{len(ads)} adapters", box=box.SIMPLE_HEAD if narrow else box.HEAVY_HEAD, pad_edge=not narrow)
        cols = ["", "version", "id", "kind", "on", "replaces", "memories", "forgotten", "created", "base model", "run"]
        # one line per adapter with the id whole (what rollback and use take): in a narrow terminal the
        # wide columns go (--json has them) rather than every column folding to nothing
        if out.width < 150:
            cols = [c for c in cols[:-2] if not narrow or c not in ("replaces", "forgotten")]
        for c in cols:
            head = {"version": "ver", "memories": "mem"}.get(c, c) if narrow else c
            t.add_column(head, no_wrap=True, overflow="ellipsis", min_width=20 if c == "id" else None)
        version = {a.id: f"v{a.version}" for a in ads}
        for a in ads:
            cells = {
                "": "*" if a.current else "",
                "version": f"v{a.version}",
                "id": a.id,
                "kind": a.kind,
                "on": version.get(a.parent_id, a.parent_id or "base"),
                "replaces": version.get(a.replaces, a.replaces or "-"),
                "memories": str(len(a.trace_ids)),
                "forgotten": str(len(a.forgotten)) if a.forgotten else "-",  # trained on memories since forgotten
                "created": a.created_at[5 if narrow else 0 : 16].replace("T", " "),
                "base model": a.base_model,
                "run": a.run_id,
            }
            t.add_row(*(plain(cells[c]) for c in cols))
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
    from contextlib import nullcontext

    from .adapters import prunable, prune
    from .home import open_home, sleep_lock
    from .store import Store

    h = open_home(home)
    # deleting waits for no job: a seed or consolidation publishing meanwhile could be building on these
    with nullcontext() if dry_run else sleep_lock(h, "prune"), Store(h.db_path, readonly=dry_run) as st:
        cands = prunable(st)
        if not cands:
            emit(
                {"pruned": []},
                as_json,
                lambda _: out.print(plain("nothing to prune: every adapter is in the current lineage")),
            )
            return
        listing = ", ".join(f"v{a.version} ({a.kind})" for a in cands)
        if dry_run:
            emit(
                {"would_prune": [a.model_dump() for a in cands]},
                as_json,
                lambda _: out.print(line(f"would delete {listing}")),
            )
            return
        if not yes:
            if not sys.stdin.isatty():
                raise UsageError(f"would delete {listing}; pass --yes to confirm (no terminal to ask on)")
            if not typer.confirm(safe(f"delete {listing}?")):
                raise typer.Exit(1)
        done = prune(st, [a.id for a in cands])
    emit({"pruned": [a.model_dump() for a in done]}, as_json, lambda _: out.print(line(f"deleted {listing}")))


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
        lambda _: out.print(line(f"current adapter: {f'v{a.version} ({a.id})' if a else 'none (base model)'}")),
    )


@app.command()
def runs(home: str | None = HomeOpt, as_json: bool = JsonOpt) -> None:
    """Runs and their status."""
    from .memories import open_store

    with open_store(home, readonly=True) as st:
        rs = st.runs()

    def human(rs) -> None:
        t = Table(title=f"{len(rs)} runs")
        for c in ("id", "kind", "status", "started", "ended", "folder"):
            t.add_column(c)
        for r in rs:
            t.add_row(*map(plain, (r.id, r.kind, r.status, r.started_at[:19], (r.ended_at or "")[:19], r.dir)))
        out.print(t)

    emit(rs, as_json, human)


@app.command()
def forget(
    memories: list[str] = typer.Argument(None, help="Memory ids (or unambiguous prefixes of them) to forget."),
    match: str | None = typer.Option(
        None, "--match", help="Forget every memory whose text contains this (plain text, any case; not a pattern)."
    ),
    retrain: bool = typer.Option(
        False, "--retrain", help="Then consolidate the remaining memories into a fresh adapter, made current."
    ),
    yes: bool = typer.Option(False, "--yes", "-y", help="Delete without asking."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only list what would go."),
    recipe: str | None = typer.Option(
        None, "--recipe", "-r", help="For --retrain (default: the recipe of the current adapter's run)."
    ),
    overrides: list[str] = SetOpt,
    home: str | None = HomeOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Remove memories with their probes, teacher data and run copies; mark the adapters trained on them."""
    from .forget import forget as api_forget
    from .recipe import parse_overrides

    if not memories and match is None and not retrain:
        raise UsageError("nothing to forget: give memory ids, --match TEXT, or --retrain")
    ov = parse_overrides(overrides)
    plan = api_forget(memories, match=match, home=home, dry_run=True) if memories or match is not None else None
    if plan is not None and (dry_run or plan.status == "nothing"):
        emit(plan, as_json, lambda r: out.print(plain(r.message)))
        return
    if plan is not None and not yes:
        if not sys.stdin.isatty():
            raise UsageError(f"{plan.message}; pass --yes to confirm (no terminal to ask on)")
        if not typer.confirm(safe(f"{plan.message}. Go ahead?")):
            raise typer.Exit(1)
    ids = plan.memories if plan is not None else None  # exactly what was shown, even if more match by now
    res = api_forget(ids, home=home, retrain=retrain, recipe=recipe, overrides=ov, show_progress=not as_json)
    emit(res, as_json, lambda r: out.print(plain(r.message)))
    if res.exit_code:
        raise typer.Exit(res.exit_code)


def _forgotten_note(home: str | None) -> None:
    """`list` says when the current adapter's weights still hold memories that were forgotten."""
    from .adapters import lineage
    from .memories import open_store

    with open_store(home, readonly=True) as st:
        held = [a for a in lineage(st, st.current_adapter_id()) if a.forgotten]
    if held:
        n = sum(len(a.forgotten) for a in held)
        vs = ", ".join(f"v{a.version}" for a in held)
        note = f"note: the current adapter stack ({vs}) was trained on {n} memories since forgotten"
        err.print(plain(f"{note}; sleepctl forget --retrain retrains it without them", "dim"))


# --- eval ------------------------------------------------------------------------------------------------


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def print_report(r, per_memory: bool = False, samples: int = 4) -> None:
    what = f"adapter v{r.adapter_version}" if r.adapter_version else "no adapter"
    new = next((m for m in r.methods if m.group == "new"), None)
    users = sum(x.origin == "user" for x in new.results) if new else 0
    split = f" ({users} user, {len(new.results) - users} teacher)" if new and new.results else ""
    rows = r.table()
    titles = {
        "new": f"eval of {what} on {r.student}: {r.probes_new} held-out probes{split}",
        "retention": f"retention: {r.probes_retention} probes of memories consolidated by earlier sleeps",
    }
    if not rows:
        out.print(plain(titles["new"]))
    # one table per group, so that each fits 80 columns (a pipe or CI); general ability is the first one's
    for group in dict.fromkeys(row["group"] for row in rows):
        ppl = group == rows[0]["group"]
        t = Table(title=plain(titles.get(group, group)))
        for c in ("method", "contains", "user", "teacher", "F1", "judge", *(("ppl", "ppl change") if ppl else ())):
            t.add_column(c, justify="left" if c == "method" else "right", no_wrap=True)
        for row in (x for x in rows if x["group"] == group):
            cells = [
                row["method"],
                _pct(row["contains"]),
                _pct(row["user"]),  # the probes the user wrote: what a user asks
                _pct(row["teacher"]),
                f"{row['f1']:.3f}",
                _pct(row["judge"]),
            ]
            if ppl:
                cells += [
                    "-" if row["ppl"] is None else f"{row['ppl']:.2f}",
                    "-" if row["ppl_change"] is None else f"{100 * row['ppl_change']:+.1f}%",
                ]
            t.add_row(*map(plain, cells))
        out.print(t)
    for m in r.methods:
        if m.method in ("sleep", "in-context") and m.group == "new" and m.results:
            out.print(line((m.method, "bold"), ": sample outputs beside their references"))
            for x in m.results[:samples]:
                mark = ("✓", "green") if x.contains else ("✗", "red")
                out.print(line("  ", mark, f" Q: {x.question}"))  # probes and outputs are stored text, not markup
                out.print(line(f"     ref: {x.reference}"))
                out.print(line(f"     out: {x.output[:160]!r}"))
    if per_memory:
        pm = Table(title="per memory (contains-match, new probes)")
        methods = [m for m in r.methods if m.group == "new"]
        pm.add_column("memory")
        for m in methods:
            pm.add_column(plain(m.method))
        ids = sorted({x.trace_id for m in methods for x in m.results})
        for tid in ids:
            cells = []
            for m in methods:
                xs = [x for x in m.results if x.trace_id == tid]
                cells.append(f"{sum(x.contains for x in xs)}/{len(xs)}")
            pm.add_row(*map(plain, (tid, *cells)))
        out.print(pm)
    for n in r.notes:
        err.print(plain(f"note: {n}", "dim"))
    if r.path:
        err.print(plain(f"report: {r.path} (plot beside it: eval.png)", "dim"))


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
            t = Table(title=plain(f"{compare[0]}  vs  {compare[1]}"))
            # the user's probes beside the whole (what a user asks); F1 stays in --json
            for c in ("method", "probes", "A contains", "B contains", "A user", "B user", "A ppl", "B ppl"):
                t.add_column(c)
            for x in rows:
                cells = (
                    x["method"],
                    x["group"],
                    _pct(x["a_contains"]),
                    _pct(x["b_contains"]),
                    _pct(x["a_user"]),
                    _pct(x["b_user"]),
                    "-" if x["a_ppl"] is None else f"{x['a_ppl']:.2f}",
                    "-" if x["b_ppl"] is None else f"{x['b_ppl']:.2f}",
                )
                t.add_row(*map(plain, cells))
            out.print(t)

        emit(rows, as_json, human)
        return
    r = evaluate(
        target,
        home=home,
        recipe=recipe,
        student=student,
        baselines=baselines,
        overrides=parse_overrides(overrides),
        show_progress=True,  # stderr: --json output on stdout stays clean
    )
    emit(r, as_json, lambda r: print_report(r, per_memory))


# --- using what a night produced: export, chat, serve ----------------------------------------------------

AdapterIdOpt = typer.Option(
    None, "--adapter-id", help="An adapter (v2, or its id) instead of the current one; its whole lineage is used."
)
EngineOpt = typer.Option(
    "auto", "--engine", help="auto (the recipe's engine where this machine runs it, else hf), hf or vllm."
)


@app.command("export")
def export_cmd(
    adapter: str | None = typer.Option(
        None, "--adapter", help="Write one PEFT adapter folder equal to the stack on the plain base."
    ),
    merged: str | None = typer.Option(
        None, "--merged", help="Write a standalone model folder: the stack merged into the base weights."
    ),
    adapter_id: str | None = AdapterIdOpt,
    dtype: str = typer.Option(
        "auto", "--dtype", help="auto (adapter: float32, exact; merged: the base's), float32, bfloat16 or float16."
    ),
    base_name: str | None = typer.Option(
        None, "--base-name", help="The base the adapter's config names (default: the alias's Hugging Face id)."
    ),
    force: bool = typer.Option(False, "--force", help="Replace DIR when it exists and is not empty."),
    home: str | None = HomeOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Export the current adapter stack as one PEFT adapter or a merged model folder (no sleepctl needed to load)."""
    if not adapter and not merged:
        raise UsageError("nothing to export: give --adapter DIR, --merged DIR, or both")
    if adapter and merged and os.path.abspath(adapter) == os.path.abspath(merged):
        raise UsageError("--adapter and --merged name the same folder")
    if dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise UsageError(f"unknown --dtype {dtype!r}: use auto, float32, bfloat16 or float16")
    if base_name is not None and not adapter:
        raise UsageError("--base-name names the base of an --adapter export")
    from .export import export_adapter, export_merged

    done = []
    if adapter:
        done.append(
            export_adapter(adapter, home=home, adapter_id=adapter_id, force=force, dtype=dtype, base_name=base_name)
        )
    if merged:
        done.append(export_merged(merged, home=home, adapter_id=adapter_id, force=force, dtype=dtype))
    emit(done if len(done) > 1 else done[0], as_json, lambda _: [out.print(plain(r.message)) for r in done])


def _sampling_args(max_new_tokens: int, temperature: float) -> None:
    if max_new_tokens < 1:
        raise UsageError("--max-new-tokens must be at least 1")
    if not (math.isfinite(temperature) and 0.0 <= temperature <= 2.0):
        raise UsageError("--temperature must be between 0 (greedy) and 2")


@app.command()
def chat(
    prompt: str | None = typer.Option(
        None, "--prompt", "-p", help="Ask this once and print the answer; without it, one message per line of stdin."
    ),
    system: str | None = typer.Option(
        None, "--system", help="The system prompt (default: the one the stack was trained with)."
    ),
    base: bool = typer.Option(False, "--base", help="Talk to the plain base model instead, for comparison."),
    adapter_id: str | None = AdapterIdOpt,
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="Longest answer, in tokens."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 is greedy (the default), as eval samples."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed (temperature > 0)."),
    engine: str = EngineOpt,
    recipe: str | None = typer.Option(
        None, "--recipe", "-r", help="Recipe for settings (default: the recipe of the adapter's run)."
    ),
    home: str | None = HomeOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Talk to the current adapter stack: one --prompt, or a conversation from stdin (/exit ends, /reset restarts)."""
    _sampling_args(max_new_tokens, temperature)
    if engine not in ("auto", "hf", "vllm"):
        raise UsageError(f"unknown --engine {engine!r}: use auto, hf or vllm")
    prompt = None if prompt is None else _utf8_arg(prompt, "--prompt")
    system = None if system is None else _utf8_arg(system, "--system")
    if prompt is not None and not prompt.strip():
        raise UsageError("--prompt is empty")
    from .chat import ChatModel, chat_loop, stdin_lines

    model = ChatModel(home, adapter_id=adapter_id, base=base, recipe=recipe, engine=engine, system_prompt=system)
    try:
        if prompt is not None:
            r = model.reply(
                [{"role": "user", "content": prompt}],
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                seed=seed,
            )
            emit(model.result(prompt, r), as_json, lambda res: _print_answer(res.answer, res.finish_reason))
            return
        tty = sys.stdin.isatty()
        if not as_json:
            err.print(plain(f"chatting with {model.describe()}; /exit ends, /reset starts over", "dim"))

        def on_reply(text: str, r) -> None:
            if as_json:
                sys.stdout.write(json.dumps(model.result(text, r).model_dump(mode="json"), ensure_ascii=True) + "\n")
                sys.stdout.flush()
            else:
                _print_answer(r.text, r.finish_reason)

        chat_loop(
            model,
            stdin_lines(),
            on_reply,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            seed=seed,
            ask=(lambda: err.print("> ", end="")) if tty else None,
            on_reset=(lambda: err.print(plain("(a new conversation)", "dim"))) if not as_json else None,
        )
    finally:
        model.close()


def _print_answer(text: str, finish_reason: str) -> None:
    out.print(plain(text, multiline=True), soft_wrap=True)  # model output is plain text, never markup
    if finish_reason == "length":
        err.print(plain("(cut at --max-new-tokens)", "dim"))


@app.command(context_settings={**HELP, "allow_extra_args": True})
def serve(
    ctx: typer.Context,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    port: int = typer.Option(8000, "--port", help="Port to listen on (0: a free one, printed)."),
    model_name: str | None = typer.Option(
        None, "--model-name", help="The model name clients ask for (default: the home's folder name, or sleepctl)."
    ),
    adapter_id: str | None = typer.Option(
        None, "--adapter-id", help="Serve this adapter's lineage (default: the current one, followed as it changes)."
    ),
    engine: str = typer.Option(
        "auto",
        "--engine",
        help="auto (vLLM's server where the recipe says engine: vllm and this machine runs it, else hf), hf or vllm.",
    ),
    print_command: bool = typer.Option(
        False, "--print-command", help="Export the adapter and print the vLLM server command, without running it."
    ),
    api_key: str | None = typer.Option(
        None, "--api-key", envvar="SLEEPCTL_API_KEY", help="Require this key (Authorization: Bearer KEY)."
    ),
    home: str | None = HomeOpt,
    as_json: bool = JsonOpt,
) -> None:
    """An OpenAI-compatible endpoint on the current stack: vLLM's server on a GPU, a small one on CPU.

    Arguments after `--` go to `vllm serve` as they are (e.g. `-- --gpu-memory-utilization 0.3`)."""
    if not 0 <= port <= 65535:
        raise UsageError("--port must be between 0 and 65535")
    if engine not in ("auto", "hf", "vllm"):
        raise UsageError(f"unknown --engine {engine!r}: use auto, hf or vllm")
    from .serve import command_line, default_model_name, exec_vllm, make_server, use_vllm, vllm_plan

    name = model_name or default_model_name(home)
    if print_command or use_vllm(home, adapter_id, engine):
        if port == 0:
            raise UsageError("--port 0 is for the CPU server; give vLLM a port")
        plan = vllm_plan(home, adapter_id=adapter_id, host=host, port=port, model_name=name, extra=ctx.args)
        if print_command:
            emit(plan, as_json, lambda p: out.print(plain(command_line(p)), soft_wrap=True))
            if not as_json:
                err.print(plain(plan.message + ("; VLLM_API_KEY sets its key" if api_key else ""), "dim"))
            return
        err.print(plain(plan.message))
        err.print(plain(command_line(plan)), soft_wrap=True)
        exec_vllm(plan, api_key)
    if ctx.args:
        raise UsageError(
            f"arguments after -- are for vLLM's server, and this one is the CPU server: {' '.join(ctx.args)}",
            hint="drop them, or serve with --engine vllm on a GPU",
        )
    from .chat import ChatModel

    model = ChatModel(home, adapter_id=adapter_id, engine="hf", follow=adapter_id is None, require_adapter=False)
    srv = make_server(
        model, host, port, model_name=name, api_key=api_key, log=lambda s: err.print(plain(s, "dim"), soft_wrap=True)
    )
    bound, bound_port = srv.server_address[:2]
    url = f"http://{bound}:{bound_port}/v1"
    if as_json:
        a = model.adapter
        ready = {
            "url": url,
            "model": name,
            "adapter_id": a.id if a else None,
            "adapter_version": a.version if a else None,
        }
        sys.stdout.write(json.dumps(ready, ensure_ascii=True) + "\n")
        sys.stdout.flush()
    err.print(line("serving ", (name, "bold"), f" ({model.describe()}) at {url}; Ctrl-C stops"))
    if model.adapter is None:
        err.print(plain("no adapter yet: the plain base answers until a night makes one current", "dim"))
    if bound not in ("127.0.0.1", "::1", "localhost") and not api_key:
        err.print(
            plain("warning: listening beyond this machine without --api-key; the weights hold memories", "yellow")
        )
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        err.print(plain("stopped", "dim"))
    finally:
        srv.server_close()
        model.close()


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
                line(
                    (x["name"], "bold"),
                    f": {x['description']}  (teacher {x['teacher']} → student {x['student']}; {x['profiles']})",
                )
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
    emit(
        r.model_dump(),
        as_json,
        lambda d: out.print(plain(f"# {path}\n" + yaml.safe_dump(d, sort_keys=False), multiline=True)),
    )


# --- errors ----------------------------------------------------------------------------------------------

SQLITE_CORRUPT, SQLITE_FULL, SQLITE_NOTADB = 11, 13, 26


def _db_file() -> str:
    from .home import resolve_home

    return str(resolve_home(_home_arg) / "sleepctl.db")


# What `pip install 'sleepctl[train]'` adds; a record-only install lacks them.
TRAIN_MODULES = {"torch", "transformers", "peft", "accelerate", "safetensors", "gguf", "matplotlib", "text_to_num"}


def error_line(e: Exception) -> tuple[str, int]:
    """The one line (after `error: `) and the exit code that `main` prints for `e`.

    What a user can act on is named, with the fix; any other exception is a bug and says so, with
    SLEEPCTL_DEBUG=1 to see its traceback: one line either way, nothing swallowed.
    """
    if isinstance(e, SleepError):
        return str(e) + (f" (hint: {e.hint})" if e.hint else ""), e.exit_code
    if isinstance(e, sqlite3.DatabaseError) and not isinstance(e, sqlite3.ProgrammingError | sqlite3.InterfaceError):
        db, code = _db_file(), (getattr(e, "sqlite_errorcode", 0) or 0) & 0xFF  # the primary code of an extended one
        msg = str(e).split(" with text ")[0]  # "Could not decode to UTF-8 column 'text' with text <the damaged row>"
        if code == SQLITE_FULL:
            return f"disk full writing {db}: the write was rolled back (hint: free space, run it again)", EXIT_RUNTIME
        if code in (SQLITE_CORRUPT, SQLITE_NOTADB) or msg.startswith("Could not decode"):
            return (
                f"the store {db} is damaged ({msg})"
                f" (hint: recover what it holds: sqlite3 {db} .recover | sqlite3 recovered.db, then put that in its place)"
            ), EXIT_RUNTIME
        return f"the store {db}: {msg}", EXIT_RUNTIME
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in str(e):
        where = f" writing {e.filename}" if isinstance(e, OSError) and e.filename else ""
        return f"disk full{where} (hint: free some space and run it again; an interrupted run resumes)", EXIT_RUNTIME
    if isinstance(e, OSError):
        return str(e), EXIT_USAGE if isinstance(e, FileNotFoundError) else EXIT_RUNTIME
    if isinstance(e, UnicodeError):
        return f"text that is not valid UTF-8 ({e.reason})", EXIT_USAGE
    if isinstance(e, RecursionError):
        return "input nested too deeply to read", EXIT_USAGE
    if isinstance(e, MemoryError):
        return "out of memory", EXIT_RUNTIME
    if isinstance(e, ModuleNotFoundError) and (e.name or "").split(".")[0] in TRAIN_MODULES:
        return (
            f"this command needs the training extras ({e.name} is not installed)"
            " (hint: pip install 'sleepctl[train]'; on a CPU machine install torch first:"
            " pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu)"
        ), EXIT_RUNTIME
    bug = f"internal error: {type(e).__name__}: {e} (hint: a sleepctl bug; SLEEPCTL_DEBUG=1 shows the traceback)"
    return bug, EXIT_RUNTIME


def main() -> None:
    debug = os.environ.get("SLEEPCTL_DEBUG") == "1"
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):  # a terminal that is not UTF-8 gets \xNN, not a UnicodeEncodeError
            stream.reconfigure(errors="backslashreplace")
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(EXIT_INTERRUPTED)
    except Exception as e:
        if debug:
            raise
        if isinstance(e, BrokenPipeError):  # the reader went away: no second error when stdout is flushed at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        msg, code = error_line(e)
        err.print(line(("error:", "red"), " ", one_line(msg)), highlight=False)
        sys.exit(code)


if __name__ == "__main__":
    main()
