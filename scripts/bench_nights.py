"""Many nights in a row: record, seed, dream (optional), consolidate when the recipe says so, evaluate.

    make bench-nights                                              # quick CPU recipe, the full method
    python scripts/bench_nights.py --recipe qwen-small-large --teacher small --student large \\
        --set engine=vllm --configs stack,replay,replay+anchor,full --seeds 3          # on a GPU
    # seeds side by side on one GPU, each process with its own engines and a share of the card (a trainer peaks
    # near 22 GB, engines at 0.12 + 0.05 hold 14 GB on an H100; on an H200 two such ran their nights as fast as
    # one alone on the next GPU, 96-106 s):
    for s in 0 1; do python scripts/bench_nights.py ... --first-seed $s --name seed$s \\
        --set vllm.gpu_memory_utilization=0.12 --set vllm.teacher_gpu_memory_utilization=0.05 & done; wait
    python scripts/bench_nights.py --merge .bench/nights/seed0 .bench/nights/seed1 --name seeds
    # on a machine of several GPUs, one seed per GPU, each with its own vLLM compile cache and a share of the
    # CPU threads (side by side without OMP_NUM_THREADS, nights took twice as long on an H200 host):
    for s in 0 1; do CUDA_VISIBLE_DEVICES=$s VLLM_CACHE_ROOT=/tmp/vc$s OMP_NUM_THREADS=8 python scripts/bench_nights.py ... \
        --first-seed $s --name seed$s & done; wait                 # then --merge as above
    # a run cut short (--max-minutes, a crash) continues with the same command and --resume; settings that
    # differ from the run's start are recorded on each night they applied to (overrides_changed)

Memory sets: benchmarks/nights/night1.jsonl .. night5.jsonl (fictional; later nights correct earlier
facts, some facts arrive only in tool results; benchmarks/nights/README.md). Per night and configuration:
recall of the new night's user probes, recall of every earlier night (a retention matrix, on the probes
no later memory corrects), update probes answered with the latest value (and with a stale one), what the
rewritten answers of corrected memories carry (the old value or the latest: `rewrites`), general
perplexity drift and KL(base || adapter) drift, wall time per phase. One table, JSON, and a PNG of the
retention curves. Models and vLLM engines stay loaded across nights and configurations (one process).

Configurations (ablations, each on the same nights and probes):
  stack           what the tool did before: each night a new adapter on the frozen stack, trained on the
                  new memories alone (no replay, no related memories in the teacher's view, no anchor)
  replay          + replay of earlier memories, related memories shown to the teacher in time order
  replay+anchor   + the KL anchor to the base on general text
  full            + consolidation of the stack (the recipe as it is)
A benchmark, not a test: it measures and prints; nothing here fails on a number.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from bench_merge import code_line, commit_of, commits, method, refuse_other_benchmarks, shares
from rich.console import Console
from rich.table import Table

from sleepctl import record
from sleepctl.adapters import lineage
from sleepctl.consolidate import consolidate
from sleepctl.dream import dream
from sleepctl.engines import release_engines
from sleepctl.evaluate import evaluate
from sleepctl.memories import open_store
from sleepctl.recipe import load_recipe, parse_overrides
from sleepctl.runs import versions
from sleepctl.scoring import contains_match
from sleepctl.seed import seed

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {
    "stack": {
        "replay.fraction": 0.0,
        "replay.max_related": 0,
        "anchor.kl_coef": 0.0,
        "consolidate.max_adapters": 64,
    },
    "replay": {"anchor.kl_coef": 0.0, "consolidate.max_adapters": 64},
    "replay+anchor": {"consolidate.max_adapters": 64},
    "full": {},
}


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA), {platform.machine()}"
    import os

    return f"CPU, {os.cpu_count()} cores, {platform.machine()}"


def load_nights(folder: Path, n: int) -> list[list[dict]]:
    nights = []
    for k in range(1, n + 1):
        p = folder / f"night{k}.jsonl"
        nights.append([json.loads(x) for x in p.read_text().split("\n") if x.strip()])  # JSONL: "\n" only
    return nights


def run_config(run: dict, nights: list[list[dict]], args, overrides: dict, work: Path, save, deadline: float) -> bool:
    """The nights of one configuration and training seed, in its own home, continuing where `run` stopped.

    A row of figures per night goes into `run["nights"]` and is saved at once (`save`), so a cut-off call
    loses at most the night in flight and `--resume` continues with the next. Returns False when the
    time budget (`--max-minutes`) ran out before every night was done.
    """
    name, seed_no = run["config"], run["seed"]
    home = work / f"{name}-seed{seed_no}" / "home"
    run["home"] = str(home)
    ov = {**overrides, **CONFIGS[name], "training.seed": seed_no}
    load_recipe(args.recipe, ov)  # a bad override fails here, before any night
    con = Console(stderr=True)
    corrected = {q for recs in nights for r in recs for q in _corrects(r)}
    updates: dict[str, list[tuple[int, str]]] = {q: [] for q in corrected}  # question -> [(night, answer)]
    for k, recs in enumerate(nights, start=1):
        for r in recs:
            for p in r.get("probes", []):
                if p["question"] in updates:
                    updates[p["question"]].append((k, p["answer"]))
    for k, recs in enumerate(nights, start=1):
        if k <= len(run["nights"]):
            continue  # done by an earlier call
        if time.time() > deadline:
            return False
        t0 = time.time()
        src = home.parent / f"night{k}.jsonl"
        src.parent.mkdir(parents=True, exist_ok=True)
        clean = [{key: v for key, v in r.items() if key != "corrects"} for r in recs]  # the benchmark's own field
        src.write_text("".join(json.dumps(r) + "\n" for r in clean))
        record([src], home=home)  # a night cut off after recording: its duplicates are skipped here
        with open_store(home) as st:  # which night each memory came from, by the file it was recorded from
            memory_night = {t.id: int(re.search(r"night(\d+)\.jsonl", t.source).group(1)) for t in st.traces()}
        seen = {q: [(n, a) for n, a in h if n <= k] for q, h in updates.items()}
        phases: dict[str, float] = {}
        t = time.time()
        s = seed(
            args.recipe,
            home=home,
            teacher=args.teacher,
            student=args.student,
            overrides=ov,
            show_progress=False,
            keep_engines=True,
        )
        phases["seed"] = time.time() - t
        d = None
        if args.dream:
            t = time.time()
            d = dream(args.recipe, home=home, overrides=ov, show_progress=False, consolidate=False, keep_engines=True)
            phases["dream"] = time.time() - t
        t = time.time()
        c = consolidate(args.recipe, home=home, if_needed=True, overrides=ov, show_progress=False, keep_engines=True)
        phases["consolidate"] = time.time() - t
        t = time.time()
        ev = evaluate(home=home, overrides=ov, keep_outputs=True, keep_engines=True)
        phases["eval"] = time.time() - t
        wall = time.time() - t0
        row = night_row(k, ev, memory_night, seen)
        with open_store(home) as st:
            row["rewrites"] = rewrite_counts(s.run_dir, st.probes(), seen)
            depth = len(lineage(st, st.current_adapter_id()))
        row.update(
            {
                "wall_s": wall,
                "phases_s": phases,
                "stack_depth": depth,
                "seed_steps": s.steps,
                "seed_replayed": s.replayed,
                "seed_kl_drift": s.kl_drift,
                "dream": None
                if d is None
                else {"status": d.status, "made_current": d.made_current, "rewarded": d.rewarded},
                "consolidation": None
                if c.status == "nothing"
                else {
                    "status": c.status,
                    "made_current": c.made_current,
                    "worse": c.worse,
                    "steps": c.steps,
                    "init_kept": c.init_kept,
                    "phases_s": c.phases_s,
                    "before": c.before,
                    "after": c.after,
                },
            }
        )
        run["nights"].append(row)
        save()
        con.print(
            f"[{name} seed {seed_no}] night {k}: new {_pct(row['recall'].get(k))}, night 1 {_pct(row['recall'].get(1))}, "
            f"updates {_pct(row['update_latest'])} (rewrites old/new {row['rewrites']['stale']}/"
            f"{row['rewrites']['latest']} of {row['rewrites']['examples']}), "
            f"ppl {row['ppl_change']:+.1%}, KL {row['kl_drift'] or 0:.4f}, "
            f"{wall:.0f} s ({', '.join(f'{a} {b:.0f} s' for a, b in phases.items())}), stack {depth}"
        )
    return True


def night_row(k: int, ev, memory_night: dict[str, int], updates: dict[str, list[tuple[int, str]]]) -> dict:
    """Recall per night of origin on stable user probes; latest-value accuracy on corrected questions."""
    base = {m.method: m for m in ev.methods}
    sleep = [r for m in ev.methods if m.method == "sleep" for r in m.results]
    incontext = [r for m in ev.methods if m.method == "in-context" for r in m.results]
    corrected = set(updates)
    by_night: dict[int, list[bool]] = {}
    for r in sleep:
        j = memory_night.get(r.trace_id)
        if j is None or r.question in corrected or not _user(r):
            continue
        by_night.setdefault(j, []).append(r.contains)
    ic: dict[int, list[bool]] = {}
    for r in incontext:
        j = memory_night.get(r.trace_id)
        if j == k and r.question not in corrected and _user(r):
            ic.setdefault(j, []).append(r.contains)
    latest, stale, answers = [], [], []
    sleep_by_q: dict[str, list] = {}
    for r in sleep:
        sleep_by_q.setdefault(r.question, []).append(r)
    for q, hist in updates.items():
        seen = [(n, a) for n, a in hist if n <= k]
        if len(seen) < 2:
            continue  # not corrected yet by night k
        new_a, old_a = seen[-1][1], seen[-2][1]
        outs = [r.output for r in sleep_by_q.get(q, [])]
        if outs:
            o = outs[0]
            latest.append(contains_match(o, new_a))
            stale.append(contains_match(o, old_a))
            # what was said, to tell a stale answer from a wrong one and a late correction from an early one
            answers.append(
                {
                    "question": q,
                    "latest": new_a,
                    "stale": old_a,
                    "corrected_on": seen[-1][0],
                    "output": o,
                    "is_latest": latest[-1],
                    "is_stale": stale[-1],
                }
            )
    ppl = ev.perplexity
    return {
        "night": k,
        "recall": {j: statistics.mean(v) for j, v in sorted(by_night.items())},
        "probes": {j: len(v) for j, v in sorted(by_night.items())},
        "in_context": statistics.mean(ic[k]) if ic.get(k) else None,
        "update_latest": statistics.mean(latest) if latest else None,
        "update_stale": statistics.mean(stale) if stale else None,
        "updates_checked": len(latest),
        "update_answers": answers,
        "ppl": ppl.get("sleep"),
        "ppl_base": ppl.get("base"),
        "ppl_change": ppl["sleep"] / ppl["base"] - 1 if ppl.get("sleep") else 0.0,
        "kl_drift": ev.kl_drift,
        "superseded": ev.superseded,
        "all_probe_recall": base["sleep"].contains if "sleep" in base else None,
    }


def rewrite_counts(run_dir: str | None, probes, seen: dict[str, list[tuple[int, str]]]) -> dict:
    """What tonight's rewritten answers of corrected memories carry: the old value, the latest, both.

    The rewrite is where a correction reaches an earlier memory's replayed data. Counted here, a run says
    whether replay will rehearse the new value or keep the old one (the teacher may repeat it).
    """
    stale: dict[str, list[tuple[str, str]]] = {}  # memory -> [(its old answer, the latest answer)]
    for p in probes:
        hist = seen.get(p.question, [])
        if p.origin == "user" and len(hist) >= 2 and not contains_match(hist[-1][1], p.answer):
            stale.setdefault(p.trace_id, []).append((p.answer, hist[-1][1]))
    out = {"examples": 0, "stale": 0, "latest": 0, "both": 0}
    data = Path(run_dir) / "data.json" if run_dir else None
    if data is None or not data.exists():
        return out
    for e in json.loads(data.read_text()).get("refreshed", []):
        pairs = stale.get(e["trace_id"])
        if not pairs:
            continue
        text = " ".join([e["prompt"], *e["samples"][:1]])
        old = any(contains_match(text, a) for a, _ in pairs)
        new = any(contains_match(text, b) for _, b in pairs)
        out["examples"] += 1
        if old or new:
            out["both" if old and new else "stale" if old else "latest"] += 1
    return out


def _user(r) -> bool:
    return r.origin == "user"


def _corrects(r: dict) -> list[str]:
    c = r.get("corrects", [])
    return [c] if isinstance(c, str) else list(c)


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _stat(runs: list[dict], f) -> dict | None:
    xs = [x for x in (f(r) for r in runs) if x is not None]
    if not xs:
        return None
    return {"mean": statistics.mean(xs), "sd": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs)}


def _kept(r: dict) -> float | None:
    first, last = r["nights"][0]["recall"].get(1), r["nights"][-1]["recall"].get(1)
    return (last or 0.0) / first if first else None


def summarise(results: list[dict]) -> dict:
    """Mean and spread over training seeds of each configuration's headline figures, after the last night that
    all its runs reached (a run stopped early by --max-minutes shortens the summary, never mixes nights)."""
    out: dict = {}
    for name in dict.fromkeys(r["config"] for r in results):
        full = [r for r in results if r["config"] == name]
        last = min(len(r["nights"]) for r in full)
        runs = [{**r, "nights": r["nights"][:last]} for r in full]
        out[name] = {
            "after_night": last,
            "night1_after_night1": _stat(runs, lambda r: r["nights"][0]["recall"].get(1)),
            "night1_after_last": _stat(runs, lambda r: r["nights"][-1]["recall"].get(1)),
            "night1_kept": _stat(runs, _kept),
            "new_night_recall_min": _stat(runs, lambda r: min(n["recall"].get(n["night"], 0) for n in r["nights"])),
            "new_night_recall_mean": _stat(
                runs, lambda r: statistics.mean(n["recall"].get(n["night"], 0) for n in r["nights"])
            ),
            "update_latest_last": _stat(runs, lambda r: r["nights"][-1]["update_latest"]),
            "update_stale_last": _stat(runs, lambda r: r["nights"][-1]["update_stale"]),
            "ppl_change_last": _stat(runs, lambda r: r["nights"][-1]["ppl_change"]),
            "kl_drift_last": _stat(runs, lambda r: r["nights"][-1]["kl_drift"]),
            "night_wall_max_s": _stat(runs, lambda r: max(n["wall_s"] for n in r["nights"])),
            "night_wall_mean_s": _stat(runs, lambda r: statistics.mean(n["wall_s"] for n in r["nights"])),
        }
    return out


def plot(results: list[dict], n: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["config"] for r in results))
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        runs = [r for r in results if r["config"] == name]
        reached = max(len(r["nights"]) for r in runs)  # each point: the mean over the runs that got there
        for j in range(1, reached + 1):
            xs = list(range(j, reached + 1))
            ys = [
                statistics.mean(100 * r["nights"][k - 1]["recall"].get(j, 0.0) for r in runs if len(r["nights"]) >= k)
                for k in xs
            ]
            ax.plot(xs, ys, "o-", label=f"night {j}")
        upd = [
            [
                100 * r["nights"][k - 1]["update_latest"]
                for r in runs
                if len(r["nights"]) >= k and r["nights"][k - 1]["update_latest"] is not None
            ]
            for k in range(1, n + 1)
        ]
        ax.plot(
            range(1, n + 1), [statistics.mean(u) if u else float("nan") for u in upd], "k--", label="updates (latest)"
        )
        ax.set_title(f"{name} ({len(runs)} seed{'s' if len(runs) > 1 else ''})")
        ax.set_xlabel("after night")
        ax.set_ylim(0, 105)
        ax.set_xticks(range(1, n + 1))
    axes[0][0].set_ylabel("closed-book recall of user probes (%)")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def print_tables(results: list[dict], summary: dict, n: int, title: str) -> None:
    con = Console()
    for r in results:
        t = Table(title=f"{r['config']}, training seed {r['seed']}: recall of each night's user probes after night k")
        t.add_column("after")
        for j in range(1, n + 1):
            t.add_column(f"night {j}", justify="right")
        for c in ("updates latest / stale", "ppl", "KL drift", "stack", "wall"):
            t.add_column(c, justify="right")
        for row in r["nights"]:
            cells = [_pct(row["recall"].get(j)) if j <= row["night"] else "" for j in range(1, n + 1)]
            t.add_row(
                f"night {row['night']}",
                *cells,
                f"{_pct(row['update_latest'])} / {_pct(row['update_stale'])}",
                f"{row['ppl_change']:+.1%}",
                "-" if row["kl_drift"] is None else f"{row['kl_drift']:.4f}",
                str(row["stack_depth"]),
                f"{row['wall_s']:.0f} s",
            )
        con.print(t)
    t = Table(title=title)
    for c in (
        "config",
        "nights",
        "night 1: after 1",
        "after last",
        "kept",
        "new night (min / mean)",
        "updates latest",
        "stale",
        "ppl drift",
        "KL drift",
        "night wall (max)",
    ):
        t.add_column(c, justify="left" if c == "config" else "right")

    def f(x, pct=True):
        if x is None:
            return "-"
        m, sd, k = x["mean"], x["sd"], x["n"]
        s = f"{100 * m:.1f}%" if pct else f"{m:.0f} s"
        return s + (f" ± {100 * sd:.1f}" if pct and k > 1 else (f" ± {sd:.0f}" if k > 1 else ""))

    for name, s in summary.items():
        t.add_row(
            name,
            str(s.get("after_night", n)),
            f(s["night1_after_night1"]),
            f(s["night1_after_last"]),
            f(s["night1_kept"]),
            f"{f(s['new_night_recall_min'])} / {f(s['new_night_recall_mean'])}",
            f(s["update_latest_last"]),
            f(s["update_stale_last"]),
            f(s["ppl_change_last"]),
            "-" if s["kl_drift_last"] is None else f"{s['kl_drift_last']['mean']:.4f}",
            f(s["night_wall_max_s"], pct=False),
        )
    con.print(t)


def load_results(path: Path) -> dict:
    result = json.loads(path.read_text())
    for r in result["runs"]:
        for row in r["nights"]:  # JSON keys are strings: back to night numbers
            for key in ("recall", "probes"):
                row[key] = {int(j): v for j, v in row[key].items()}
    return result


def merge(args) -> None:
    """One table over runs made in separate processes: they must be the same benchmark (recipe, overrides
    but the engines' memory shares, nights, dream) and no configuration and seed may appear twice."""
    paths = [Path(p) / "results.json" if Path(p).is_dir() else Path(p) for p in args.merge]
    parts = []
    for p in paths:
        try:
            parts.append(load_results(p))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"--merge: {p}: not a bench_nights results.json ({e})") from None

    refuse_other_benchmarks(paths, parts, ("recipe", "nights", "memories_per_night", "dream"))
    runs, seen = [], set()
    for p, r in zip(paths, parts):
        for run in r["runs"]:
            key = (run["config"], run["seed"])
            if key in seen:
                raise SystemExit(f"--merge: {p}: {key[0]} seed {key[1]} is already in an earlier file")
            seen.add(key)
            runs.append(run)
    first = parts[0]
    name = args.name or f"{first['name']}-merged"
    out = Path(args.out) / name
    out.mkdir(parents=True, exist_ok=True)
    runs = [r for r in runs if r["nights"]]
    result = {k: first[k] for k in ("recipe", "machine", "nights", "memories_per_night", "dream")}
    result["overrides"] = method(first)
    engine_shares = shares(paths, parts)
    if any(engine_shares.values()):
        result["engine_shares"] = engine_shares
    result |= {"name": name, "merged": [str(p) for p in paths], "runs": runs, "summary": summarise(runs)}
    result["commits"] = seeds_by_commit(runs)
    result["wall_s"] = max(r.get("wall_s", 0.0) for r in parts)  # side by side: the longest one
    (out / "results.json").write_text(json.dumps(result, indent=2))
    plot(runs, first["nights"], out / "retention.png")
    seeds = sorted({r["seed"] for r in runs})
    print_tables(
        runs,
        result["summary"],
        first["nights"],
        f"sleepctl bench-nights: {first['recipe']}, merged from {len(paths)} runs, training seeds {seeds}",
    )
    Console().print(code_line(result["commits"]))
    Console(stderr=True).print(f"results: {out / 'results.json'}\nplot: {out / 'retention.png'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="quick-cpu")
    ap.add_argument("--nights-dir", default=str(ROOT / "benchmarks" / "nights"))
    ap.add_argument("--nights", type=int, default=5)
    ap.add_argument("--configs", default="full", help=f"comma-separated, of: {', '.join(CONFIGS)}")
    ap.add_argument("--seeds", type=int, default=1, help="training seeds per configuration (mean ± sd)")
    ap.add_argument(
        "--first-seed", type=int, default=0, help="seeds FIRST..FIRST+SEEDS-1: one process per seed, then --merge"
    )
    ap.add_argument(
        "--merge",
        nargs="+",
        metavar="RESULTS",
        help="combine the results.json of runs made apart (e.g. one process per seed on one GPU) into OUT/NAME",
    )
    ap.add_argument("--dream", action="store_true", help="dream after each seed")
    ap.add_argument("--teacher")
    ap.add_argument("--student")
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    ap.add_argument("--out", default=str(ROOT / ".bench" / "nights"), help="results: OUT/NAME/results.json and plot")
    ap.add_argument("--work", help="where the homes go (default: beside the results)")
    ap.add_argument("--name")
    ap.add_argument("--resume", action="store_true", help="continue the runs of OUT/NAME/results.json")
    ap.add_argument("--max-minutes", type=float, help="start no new night after this long (then --resume)")
    args = ap.parse_args()

    if args.merge:
        return merge(args)
    if args.seeds < 1 or args.first_seed < 0:
        ap.error("--seeds must be at least 1 and --first-seed at least 0")
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    bad = [c for c in configs if c not in CONFIGS]
    if bad:
        ap.error(f"unknown configuration {bad[0]!r}; choose from {', '.join(CONFIGS)}")
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    name = args.name or f"nights-{Path(args.recipe).stem}-{stamp}"
    out = Path(args.out) / name
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) / name if args.work else out
    nights = load_nights(Path(args.nights_dir), args.nights)
    overrides = parse_overrides(args.overrides)
    path = out / "results.json"
    if args.resume and path.exists():
        result = load_results(path)
    else:
        result = {
            "name": name,
            "recipe": args.recipe,
            "overrides": overrides,
            "machine": machine(),
            "nights": args.nights,
            "memories_per_night": [len(x) for x in nights],
            "dream": args.dream,
            "runs": [],
        }
    if result["recipe"] != args.recipe:
        raise SystemExit(f"--resume: {path} ran recipe {result['recipe']!r}, not {args.recipe!r}")
    changed = {k: v for k, v in overrides.items() if result["overrides"].get(k) != v}
    changed |= {k: None for k in result["overrides"] if k not in overrides}
    if changed:
        Console(stderr=True).print(f"[yellow]resumed with other settings, recorded on each night from now: {changed}")
    code = versions()
    t0 = time.time()
    deadline = t0 + 60 * args.max_minutes if args.max_minutes else float("inf")

    started: dict[tuple[str, int], int] = {}  # the nights each run had when this call reached it; later: this call's

    def save() -> None:
        # a night this call ran says what it ran under where that differs from the run's start: marked as it is
        # saved, so a call cut off mid-configuration keeps the mark on the nights it finished
        for r in result["runs"]:
            for row in r["nights"][started.get((r["config"], r["seed"]), len(r["nights"])) :]:
                if changed:
                    row["overrides_changed"] = changed
                if commit_of(r.get("versions")) != commit_of(code):
                    row["commit"] = commit_of(code)
        result["summary"] = summarise([r for r in result["runs"] if r["nights"]])
        result["wall_s"] = result.get("wall_s_before", 0.0) + time.time() - t0
        path.write_text(json.dumps(result, indent=2))

    result["wall_s_before"] = result.get("wall_s", 0.0)
    finished = True
    try:
        for s in range(args.first_seed, args.first_seed + args.seeds):
            for c in configs:
                run = next((r for r in result["runs"] if r["config"] == c and r["seed"] == s), None)
                if run is None:  # the code it starts with
                    run = {"config": c, "seed": s, "versions": code, "nights": []}
                    result["runs"].append(run)
                started.setdefault((c, s), len(run["nights"]))
                ok = run_config(run, nights, args, overrides, work, save, deadline)
                if not ok:
                    finished = False
                    break
            if not finished:
                break
    finally:
        release_engines()
        save()
    if not finished:
        Console(stderr=True).print(f"time budget reached; continue with the same command and --resume: {path}")
        return
    plot(result["runs"], args.nights, out / "retention.png")
    print_tables(
        result["runs"],
        result["summary"],
        args.nights,
        f"sleepctl bench-nights: {args.recipe}, {args.nights} nights of {nights and len(nights[0])} memories, "
        f"{args.seeds} training seed(s), {machine()}",
    )
    Console().print(code_line(seeds_by_commit(result["runs"])))
    Console(stderr=True).print(f"results: {path}\nplot: {out / 'retention.png'}")


def seeds_by_commit(runs: list[dict]) -> dict[str, list[int]]:
    """A seed under the commit its run started with and under each one a resumed night of it ran under."""
    marks = [(r["seed"], {"commit": row["commit"]}) for r in runs for row in r["nights"] if row.get("commit")]
    return commits([(r["seed"], r.get("versions")) for r in runs] + marks)


if __name__ == "__main__":
    main()
