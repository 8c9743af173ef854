"""record -> seed -> eval (with the naive-SFT baseline) on a memory set, then one table and a JSON file.

    make bench                                  # quick CPU recipe on examples/
    python scripts/bench.py --recipe qwen-small-large --teacher small --student large   # on a GPU

A benchmark, not a test: it measures and prints; nothing here fails on a number.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from sleepctl import record
from sleepctl.dream import dream
from sleepctl.evaluate import EvalReport, evaluate
from sleepctl.memories import open_store
from sleepctl.recipe import parse_overrides
from sleepctl.seed import SeedResult, seed

ROOT = Path(__file__).resolve().parent.parent


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA), {platform.machine()}"
    import os

    return f"CPU, {os.cpu_count()} cores, {platform.machine()}"


def by_memory(ev: EvalReport, method: str, new_ids: set[str]) -> tuple[dict, float | None]:
    """One method's recall on this seed's memories (contains, F1, judge) and contains on older ones (retention).

    Grouping by memory, not by eval's own groups, puts seed and seed+dream on the same two probe sets: a
    dream adapter's lineage lists the dreamt memories twice (seed and dream), which eval cannot tell apart.
    """
    res = {r.probe_id: r for m in ev.methods if m.method == method for r in m.results}
    new = [r for r in res.values() if r.trace_id in new_ids]
    old = [r.contains for r in res.values() if r.trace_id not in new_ids]
    judged = [r.judge for r in new if r.judge is not None]
    recall = {
        "contains": statistics.mean(r.contains for r in new) if new else None,
        "f1": statistics.mean(r.f1 for r in new) if new else None,
        "judge": statistics.mean(judged) if judged else None,
        "probes": len(new),
    }
    return recall, (statistics.mean(old) if old else None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="quick-cpu")
    ap.add_argument("--memories", default=str(ROOT / "examples" / "memories.jsonl"))
    ap.add_argument("--teacher")
    ap.add_argument("--student")
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    ap.add_argument("--out", default=str(ROOT / ".bench"))
    ap.add_argument("--name", help="name of the result file (default: recipe and time)")
    ap.add_argument("--home", help="reuse this home: an unfinished seed resumes, a finished one is evaluated")
    ap.add_argument("--no-eval", action="store_true", help="stop after seeding (a later call with --home evaluates)")
    ap.add_argument("--no-dream", action="store_true", help="skip the dream step and its seed+dream row")
    ap.add_argument(
        "--no-baselines", action="store_true", help="skip the naive-SFT baseline (base and in-context stay)"
    )
    args = ap.parse_args()

    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    name = args.name or f"{Path(args.recipe).stem}-{stamp}"
    out = Path(args.out)
    home = Path(args.home) if args.home else out / name / "home"
    ov = parse_overrides(args.overrides)
    con = Console(stderr=True)

    t0 = time.time()
    record([args.memories], home=home)
    s = seed(args.recipe, home=home, teacher=args.teacher, student=args.student, overrides=ov)
    with open_store(home) as st:
        seed_adapter = [a for a in st.adapters() if a.kind == "seed"][-1]
        run = st.run(seed_adapter.run_id)
    if s.status == "nothing":  # seeded by an earlier call on this home: report that run
        s = SeedResult(
            status="done",
            message="",
            run_id=run.id,
            run_dir=run.dir,
            **{k: run.summary[k] for k in ("wall_s", "peak_memory_mb", "steps") if k in run.summary},
        )
    seed_wall = s.wall_s if s.wall_s else time.time() - t0
    new_ids = set(json.loads((Path(s.run_dir) / "memory_ids.json").read_text()))
    n_memories = len(new_ids)
    if args.no_eval:
        con.print(f"seeded {n_memories} memories in {seed_wall:.0f} s; run {s.run_id}")
        return
    rows = [json.loads(x) for x in (Path(s.run_dir) / "metrics.jsonl").read_text().splitlines()]
    train_tps = statistics.mean(r["tokens_per_second"] for r in rows if r.get("tokens_per_second"))
    ro = [r["rollout/tokens_per_s"] for r in rows if r.get("rollout/tokens_per_s")]
    t1 = time.time()
    saved = Path(run.dir) / "eval.json"
    ev = EvalReport.model_validate_json(saved.read_text()) if saved.exists() else None
    want_sft = not args.no_baselines
    if ev is None or (want_sft and "naive-sft" not in ev.perplexity):  # a finished evaluation is reused
        ev = evaluate(seed_adapter.id, home=home, baselines=want_sft, keep_outputs=True)
    eval_wall = time.time() - t1
    dream_row = None
    if not args.no_dream:
        t2 = time.time()
        d = dream(args.recipe, home=home, overrides=ov)
        dream_wall = time.time() - t2
        if d.adapter_id:
            dv = evaluate(d.adapter_id, home=home, keep_outputs=True)
            recall, ret_c = by_memory(dv, "sleep", new_ids)
            dream_row = {
                "contains": recall["contains"],
                "retention": ret_c,
                "f1": recall["f1"],
                "judge": recall["judge"],
                "ppl": dv.perplexity.get("sleep"),
                "made_current": d.made_current,
                "message": d.message,
                "wall_s": dream_wall,
                "dreams": d.dreams,
                "kept": d.kept,
                "rewarded": d.rewarded,
                "probes": recall["probes"],
            }
        else:
            dream_row = {"message": d.message, "wall_s": dream_wall}
    get = {m.method: m for m in ev.methods if m.group == "new"}
    retention = {m.method: m.contains for m in ev.methods if m.group == "retention"}
    base_ppl = ev.perplexity["base"]
    label = {"base": "base (closed-book)", "in-context": "in-context", "naive-sft": "naive SFT", "sleep": "seed"}

    result = {
        "name": name,
        "recipe": args.recipe,
        "memories_file": args.memories,
        "machine": machine(),
        "student": ev.student,
        "memories": n_memories,
        "heldout_probes": ev.probes_new,
        "recall": {m: {"contains": x.contains, "f1": x.f1, "judge": x.judge} for m, x in get.items()},
        "retention": retention,
        "retention_probes": ev.probes_retention,
        "perplexity": ev.perplexity,
        "ppl_change": {k: v / base_ppl - 1 for k, v in ev.perplexity.items()},
        "seed": {
            "wall_s": seed_wall,
            "steps": s.steps,
            "peak_memory_mb": s.peak_memory_mb,
            "train_tokens_per_s": train_tps,
            "rollout_tokens_per_s": statistics.mean(ro) if ro else None,
            "run_dir": s.run_dir,
        },
        "naive_sft": ev.baseline,
        "seed_dream": dream_row,
        "eval_wall_s": eval_wall,
        "samples": {
            m: [{"q": r.question, "ref": r.reference, "out": r.output, "contains": r.contains} for r in x.results[:5]]
            for m, x in get.items()
        },
    }
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(result, indent=2))

    t = Table(
        title=f"sleepctl bench: {args.recipe} on {Path(args.memories).name} ({n_memories} memories, "
        f"{ev.probes_new} held-out probes), {machine()}"
    )
    cols = ["method", "contains", "F1", "judge", "general ppl", "ppl change"]
    if retention:
        cols.insert(4, f"retention ({ev.probes_retention} older probes)")
    for c in cols:
        t.add_column(c, justify="left" if c == "method" else "right")

    def ret(v: float | None) -> list[str]:
        return [("-" if v is None else f"{100 * v:.1f}%")] if retention else []

    for m in ("base", "in-context", "naive-sft", "sleep"):
        if m in get:
            x = get[m]
            p = ev.perplexity.get(m)
            t.add_row(
                label[m],
                f"{100 * x.contains:.1f}%",
                f"{x.f1:.3f}",
                "-" if x.judge is None else f"{100 * x.judge:.1f}%",
                *ret(retention.get(m)),
                "-" if p is None else f"{p:.2f}",
                "-" if p is None else f"{100 * (p / base_ppl - 1):+.1f}%",
            )
    if dream_row and "contains" in dream_row:
        p = dream_row["ppl"]
        t.add_row(
            "seed + dream" + ("" if dream_row["made_current"] else " (not current)"),
            f"{100 * dream_row['contains']:.1f}%",
            f"{dream_row['f1']:.3f}",
            "-" if dream_row["judge"] is None else f"{100 * dream_row['judge']:.1f}%",
            *ret(dream_row["retention"]),
            "-" if p is None else f"{p:.2f}",
            "-" if p is None else f"{100 * (p / base_ppl - 1):+.1f}%",
        )
    Console().print(t)
    if dream_row:
        con.print(f"dream: {dream_row['message']} ({dream_row['wall_s']:.0f} s)")
    c = Table(title="cost")
    c.add_column("what")
    c.add_column("value", justify="right")
    c.add_row("seed wall time (record + prompts + training + save)", f"{seed_wall:.0f} s")
    c.add_row("seed optimizer steps", str(s.steps))
    c.add_row("seed peak memory", f"{s.peak_memory_mb:.0f} MiB")
    c.add_row("training tokens/s (seed, student tokens scored)", f"{train_tps:.0f}")
    c.add_row("rollout tokens/s (student sampling)", "-" if not ro else f"{statistics.mean(ro):.0f}")
    if ev.baseline:
        c.add_row(
            "naive SFT wall time / tokens/s", f"{ev.baseline['wall_s']:.0f} s / {ev.baseline['tokens_per_second']:.0f}"
        )
    c.add_row("eval wall time (all methods, baseline training included)", f"{eval_wall:.0f} s")
    Console().print(c)
    con.print(f"results: {path}")


if __name__ == "__main__":
    main()
