"""record -> seed -> eval (with the naive-SFT baseline) on a memory set, then one table and a JSON file.

    make bench                                  # quick CPU recipe on examples/
    python scripts/bench.py --recipe qwen-small-large --teacher small --student large   # on a GPU
    python scripts/bench.py --seeds 3           # three training seeds, each in its own home: mean ± sd
    python scripts/bench.py --first-seed 2 --name s2 ...   # seed 2 alone, e.g. in a second process on one GPU
    python scripts/bench.py --merge .bench/s01.json .bench/s2.json --name s012   # one table over both

Recall is split by probe origin everywhere it is printed: `user` probes are the ones the agent's user wrote
(what a user would ask), `teacher` probes were written by the teacher model from the memory.
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
from bench_merge import code_line, commits, method, refuse_other_benchmarks, shares
from rich.console import Console
from rich.table import Table

from sleepctl import record
from sleepctl.dream import dream
from sleepctl.evaluate import EvalReport, evaluate, recall_of, rescored
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
        **by_origin(new),
        "f1": statistics.mean(r.f1 for r in new) if new else None,
        "judge": statistics.mean(judged) if judged else None,
        "probes": len(new),
    }
    return recall, (statistics.mean(old) if old else None)


def by_origin(results) -> dict:
    """Contains-recall on user-written and on teacher-written probes, apart: they measure different things."""
    out = {}
    for origin in ("user", "teacher"):
        out[origin] = recall_of(results, origin)
        out[f"{origin}_probes"] = sum(r.origin == origin for r in results)
    return out


def spread(values: list) -> dict | None:
    """Mean, sample sd and n over training seeds; None where no seed had a value."""
    xs = [v for v in values if v is not None]
    if not xs:
        return None
    return {"mean": statistics.mean(xs), "sd": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs)}


def cell(s: dict | None, pct: bool = True, signed: bool = False, digits: int = 1) -> str:
    if s is None:
        return "-"
    k = 100 if pct else 1
    sign = "+" if signed else ""
    text = f"{k * s['mean']:{sign}.{digits}f}"
    if s["n"] > 1:
        text += f" ± {k * s['sd']:.{digits}f}"
    return text + ("%" if pct else "")


def one_run(args, home: Path, ov: dict, con: Console) -> dict | None:
    """record -> seed -> eval (-> dream -> eval) in one home; the numbers of one training seed."""
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
    if args.no_eval:
        con.print(f"seeded {len(new_ids)} memories in {seed_wall:.0f} s; run {s.run_id}")
        return None
    rows = [json.loads(x) for x in (Path(s.run_dir) / "metrics.jsonl").read_text().split("\n") if x.strip()]
    train_tps = statistics.mean(r["tokens_per_second"] for r in rows if r.get("tokens_per_second"))
    ro = [r["rollout/tokens_per_s"] for r in rows if r.get("rollout/tokens_per_s")]
    t1 = time.time()
    saved = Path(run.dir) / "eval.json"
    ev = rescored(EvalReport.model_validate_json(saved.read_text())) if saved.exists() else None  # as scored today
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
                **recall,
                "retention": ret_c,
                "ppl": dv.perplexity.get("sleep"),
                "made_current": d.made_current,
                "message": d.message,
                "wall_s": dream_wall,
                "dreams": d.dreams,
                "invented": d.invented,
                "kept": d.kept,
                "rewarded": d.rewarded,
            }
        else:
            dream_row = {"message": d.message, "wall_s": dream_wall}
    get = {m.method: m for m in ev.methods if m.group == "new"}
    base_ppl = ev.perplexity["base"]
    return {
        "home": str(home),
        "student": ev.student,
        "memories": len(new_ids),
        "heldout_probes": ev.probes_new,
        "recall": {
            m: {"contains": x.contains, **by_origin(x.results), "f1": x.f1, "judge": x.judge} for m, x in get.items()
        },
        "retention": {m.method: m.contains for m in ev.methods if m.group == "retention"},
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
        # the code that trained it, commit among them, as its run folder recorded it (a reused home's seed may
        # predate this call's code)
        "versions": json.loads((Path(s.run_dir) / "versions.json").read_text()),
        "samples": {
            m: [{"q": r.question, "ref": r.reference, "out": r.output, "contains": r.contains} for r in x.results[:5]]
            for m, x in get.items()
        },
    }


METRICS = ("contains", "user", "teacher", "f1", "judge")


def summarize(runs: list[dict]) -> dict:
    """Mean ± sd over training seeds of every figure the table prints."""
    methods = runs[0]["recall"]
    out: dict = {
        "recall": {m: {k: spread([r["recall"][m].get(k) for r in runs]) for k in METRICS} for m in methods},
        "retention": {m: spread([r["retention"].get(m) for r in runs]) for m in runs[0]["retention"]},
        "perplexity": {m: spread([r["perplexity"].get(m) for r in runs]) for m in runs[0]["perplexity"]},
        "ppl_change": {m: spread([r["ppl_change"].get(m) for r in runs]) for m in runs[0]["ppl_change"]},
        "seed_wall_s": spread([r["seed"]["wall_s"] for r in runs]),
    }
    dreams = [r["seed_dream"] for r in runs if r["seed_dream"] and "contains" in r["seed_dream"]]
    if dreams:
        out["seed_dream"] = {k: spread([d.get(k) for d in dreams]) for k in (*METRICS, "retention", "ppl")}
        out["seed_dream"]["made_current"] = sum(bool(d["made_current"]) for d in dreams)
    return out


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
    ap.add_argument("--seeds", type=int, default=1, help="training seeds, each in its own home (mean ± sd)")
    ap.add_argument("--first-seed", type=int, help="seeds FIRST..FIRST+SEEDS-1 (one process per part, then --merge)")
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="one table over result files of the same benchmark")
    args = ap.parse_args()
    if args.merge:
        return merge(args)
    if args.seeds < 1:
        ap.error("--seeds must be at least 1")
    if args.first_seed is not None and args.first_seed < 0:
        ap.error("--first-seed must be at least 0")
    if args.home and (args.seeds > 1 or args.first_seed is not None):
        ap.error("--home names one home; --seeds N and --first-seed make one per seed")

    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    name = args.name or f"{Path(args.recipe).stem}-{stamp}"
    out = Path(args.out)
    ov = parse_overrides(args.overrides)
    con = Console(stderr=True)

    runs = []
    per_seed = one_home_per_seed(args)
    first_seed = args.first_seed or 0
    for k in range(first_seed, first_seed + args.seeds):
        if args.home:
            home = Path(args.home)
        else:
            home = out / name / (f"home-seed{k}" if per_seed else "home")
        seed_ov = {**ov, "training.seed": k} if per_seed else ov
        r = one_run(args, home, seed_ov, con)
        if r is None:
            continue
        runs.append({**r, "training_seed": seed_ov.get("training.seed")})
        path = write_result(out / f"{name}.json", args, name, runs)  # after every seed: a cut run keeps the done ones
        if per_seed:
            rec = r["recall"]["sleep"]
            user = f", user probes {100 * rec['user']:.1f}%" if rec.get("user") is not None else ""
            con.print(f"seed {k}: seed recall {100 * rec['contains']:.1f}%{user} ({home})")
    if not runs:
        return
    first = runs[0]
    seeds = [r["training_seed"] for r in runs] if per_seed else None
    print_tables(args, first, summarize(runs), len(runs), seeds, code=code_line(seeds_by_commit(runs)))
    if first["seed_dream"]:
        con.print(f"dream: {first['seed_dream']['message']} ({first['seed_dream']['wall_s']:.0f} s)")
    con.print(f"results: {path}")


def one_home_per_seed(args) -> bool:
    """--seeds N or --first-seed: each seed trains in a home of its own and the result lists every run."""
    return args.seeds > 1 or args.first_seed is not None


def write_result(path: Path, args, name: str, runs: list[dict]) -> Path:
    """The seeds finished so far, mean ± sd over them in `summary`; `seeds_done` below `seeds` marks a cut run."""
    result = {
        "name": name,
        "recipe": args.recipe,
        "memories_file": args.memories,
        "machine": machine(),
        "seeds": args.seeds,
        "seeds_done": len(runs),
        "models": {"teacher": args.teacher, "student": args.student},  # as asked (--teacher/--student)
        "overrides": {k: v for k, v in parse_overrides(args.overrides).items() if k != "training.seed"},
        "dream": not args.no_dream,
        "baselines": not args.no_baselines,
        **runs[0],  # one seed's figures as before; `summary` holds mean ± sd over all of them
        "summary": summarize(runs),
        "commits": seeds_by_commit(runs),
        "runs": runs if one_home_per_seed(args) else [],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    return path


def seeds_by_commit(runs: list[dict]) -> dict[str, list[int]]:
    return commits([(r["training_seed"], r.get("versions")) for r in runs])


def merge(args) -> None:
    """One table over seeds run in separate processes, so several fit one device session side by side. A mean over
    seeds only means something for one benchmark: the files must agree on recipe, memory file, models, overrides
    (but the engines' memory shares), dream, baselines and machine (wall times), and hold each seed once."""
    paths = [Path(p) for p in args.merge]
    parts = []
    for p in paths:
        try:
            r = json.loads(p.read_text())
            if not r["runs"] or any(x.get("training_seed") is None for x in r["runs"]):
                raise ValueError(
                    "it names no training seed: written with one seed and no --first-seed, or before seeds were recorded"
                )
            for key in ("name", "recipe", "overrides", "machine"):
                r[key]  # noqa: B018 (present, or the file is refused here)
            parts.append(r)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise SystemExit(f"--merge: {p}: not a bench.py result with training seeds ({e})") from None
    name = args.name or f"{parts[0]['name']}-merged"
    out = Path(args.out) / f"{name}.json"
    if any(out.resolve() == p.resolve() for p in paths):
        raise SystemExit(f"--merge: {out} is one of the files merged; give another --name or --out")

    refuse_other_benchmarks(
        paths, parts, ("recipe", "memories_file", "models", "student", "dream", "baselines", "machine")
    )
    runs, seen = [], set()
    for p, r in zip(paths, parts):
        for run in r["runs"]:
            if run["training_seed"] in seen:
                raise SystemExit(f"--merge: {p}: training seed {run['training_seed']} is already in an earlier file")
            seen.add(run["training_seed"])
            runs.append(run)
    runs.sort(key=lambda x: x["training_seed"])
    first = parts[0]
    result = {k: first[k] for k in ("recipe", "memories_file", "machine", "models", "dream", "baselines")}
    result |= {
        "name": name,
        "merged": [str(p) for p in paths],
        "overrides": method(first),
        "engine_shares": shares(paths, parts),
        "seeds": len(runs),
        "seeds_done": len(runs),
        **runs[0],
        "summary": summarize(runs),
        "commits": seeds_by_commit(runs),
        "runs": runs,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    args.recipe, args.memories = first["recipe"], first["memories_file"]
    seeds = [r["training_seed"] for r in runs]
    print_tables(args, runs[0], result["summary"], len(runs), seeds, first["machine"], code_line(result["commits"]))
    Console(stderr=True).print(f"results: {out}")


def print_tables(
    args,
    first: dict,
    summary: dict,
    n_seeds: int,
    seed_ids: list | None = None,
    where: str | None = None,
    code: str | None = None,
) -> None:
    seeds = f", {n_seeds} training seeds (mean ± sd)" if n_seeds > 1 else ""
    if seed_ids:
        seeds = f", training seeds {seed_ids}" + (" (mean ± sd)" if n_seeds > 1 else "")
    t = Table(
        title=f"sleepctl bench: {args.recipe} on {Path(args.memories).name} ({first['memories']} memories, "
        f"{first['heldout_probes']} held-out probes: {first['recall']['base']['user_probes']} user, "
        f"{first['recall']['base']['teacher_probes']} teacher), {where or machine()}{seeds}"
    )
    label = {"base": "base (closed-book)", "in-context": "in-context", "naive-sft": "naive SFT", "sleep": "seed"}
    retention = summary["retention"]
    cols = ["method", "contains", "user probes", "teacher probes", "F1", "judge", "general ppl", "ppl change"]
    if retention:
        cols.insert(6, f"retention ({first['retention_probes']} older probes)")
    for c in cols:
        t.add_column(c, justify="left" if c == "method" else "right")

    def row(name: str, rec: dict, ret: dict | None, ppl: dict | None, change: dict | None) -> None:
        t.add_row(
            name,
            cell(rec["contains"]),
            cell(rec["user"]),
            cell(rec["teacher"]),
            cell(rec["f1"], pct=False, digits=3),
            cell(rec["judge"]),
            *([cell(ret)] if retention else []),
            cell(ppl, pct=False, digits=2),
            cell(change, signed=True),
        )

    for m in ("base", "in-context", "naive-sft", "sleep"):
        if m in summary["recall"]:
            row(
                label[m],
                summary["recall"][m],
                retention.get(m),
                summary["perplexity"].get(m),
                summary["ppl_change"].get(m),
            )
    sd = summary.get("seed_dream")
    if sd:
        base = summary["perplexity"]["base"]["mean"]
        change = (
            None
            if sd["ppl"] is None
            else {**sd["ppl"], "mean": sd["ppl"]["mean"] / base - 1, "sd": sd["ppl"]["sd"] / base}
        )
        current = (
            f"current {sd['made_current']}/{sd['contains']['n']}"
            if n_seeds > 1
            else ("" if sd["made_current"] else "not current")
        )
        row(f"seed + dream ({current})" if current else "seed + dream", sd, sd["retention"], sd["ppl"], change)
    Console().print(t)
    c = Table(title="cost" + (" (first seed)" if n_seeds > 1 else ""))
    c.add_column("what")
    c.add_column("value", justify="right")
    s, ev_wall = first["seed"], first["eval_wall_s"]
    c.add_row("seed wall time (record + prompts + training + save)", f"{s['wall_s']:.0f} s")
    c.add_row("seed optimizer steps", str(s["steps"]))
    c.add_row("seed peak memory", f"{s['peak_memory_mb']:.0f} MiB")
    c.add_row("training tokens/s (seed, student tokens scored)", f"{s['train_tokens_per_s']:.0f}")
    ro = s["rollout_tokens_per_s"]
    c.add_row("rollout tokens/s (student sampling)", "-" if not ro else f"{ro:.0f}")
    if first["naive_sft"]:
        b = first["naive_sft"]
        c.add_row("naive SFT wall time / tokens/s", f"{b['wall_s']:.0f} s / {b['tokens_per_second']:.0f}")
    c.add_row("eval wall time (all methods, baseline training included)", f"{ev_wall:.0f} s")
    Console().print(c)
    if code:
        Console().print(code)


if __name__ == "__main__":
    main()
