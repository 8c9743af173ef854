"""What the benchmark scripts' --merge shares: runs made in separate processes join one table only when they are
the same benchmark. Imported by bench.py and bench_nights.py (scripts/ is on the path of a script run from it)."""

from __future__ import annotations

from pathlib import Path

# how much of a GPU each vLLM engine may take: a process sharing a card with another needs less, and nothing it
# trains or measures changes with it; runs that differ only in these merge (each run's shares are kept)
ENGINE_SHARES = {"vllm.gpu_memory_utilization", "vllm.teacher_gpu_memory_utilization"}


def method(result: dict) -> dict:
    """A result's overrides without the engines' memory shares: what it trained and measured with."""
    return {k: v for k, v in result["overrides"].items() if k not in ENGINE_SHARES}


def shares(paths: list[Path], parts: list[dict]) -> dict[str, dict]:
    """Each merged file's engine memory shares, kept beside the merged result (they tell how its GPU was shared)."""
    return {str(p): {k: v for k, v in r["overrides"].items() if k in ENGINE_SHARES} for p, r in zip(paths, parts)}


def refuse_other_benchmarks(paths: list[Path], parts: list[dict], same: tuple[str, ...]) -> None:
    """Exit with the keys that differ when a file is another benchmark than the first (a mean over seeds of two
    benchmarks measures neither)."""
    for p, r in zip(paths[1:], parts[1:]):
        diff = [k for k in same if r.get(k) != parts[0].get(k)] + ["overrides"] * (method(r) != method(parts[0]))
        if diff:
            raise SystemExit(f"--merge: {p} is another benchmark than {paths[0]}: {', '.join(diff)} differ")


def commit_of(versions: dict | None) -> str:
    """The source commit a result was made with (`sleepctl.runs.versions`), short; "unknown" for a result written
    before commits were recorded or by an installed package."""
    c = (versions or {}).get("commit")
    if not c:
        return "unknown"
    return c.removesuffix("+dirty")[:12] + ("+dirty" if c.endswith("+dirty") else "")


def commits(seeds_versions: list[tuple[int, dict | None]]) -> dict[str, list[int]]:
    """Which code made which training seeds: a table over seeds of different code measures a change too, and
    says so."""
    out: dict[str, list[int]] = {}
    for seed, v in seeds_versions:
        out.setdefault(commit_of(v), []).append(seed)
    return {k: sorted(set(v), key=lambda x: -1 if x is None else x) for k, v in out.items()}


def code_line(by_commit: dict[str, list[int]]) -> str:
    if len(by_commit) <= 1:
        return f"code: {next(iter(by_commit), 'unknown')}"
    parts = "; ".join(f"{c} (seeds {', '.join(map(str, s))})" for c, s in by_commit.items())
    known = [c for c in by_commit if c != "unknown"]
    if len(known) < 2:  # one commit beside results that did not record theirs
        return f"code: {parts}: these seeds may have run different code"
    return f"code: {parts}: these seeds ran different code"
