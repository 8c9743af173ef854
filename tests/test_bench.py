"""The benchmark script runs end to end and writes its table and JSON (no number is asserted)."""

import json
import subprocess
import sys
from pathlib import Path

from .conftest import ROOT, write_recipe
from .test_dream import DREAM


def script(name: str, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run one of scripts/ as a user would."""
    return subprocess.run([sys.executable, str(ROOT / "scripts" / name), *args], capture_output=True, timeout=timeout)


def test_bench_writes_results(tmp_path, tiny_dir, small_memories):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_dir, dream=DREAM)
    out = tmp_path / "bench"
    common = ("--recipe", str(recipe), "--memories", str(small_memories), "--out", str(out))
    r = script("bench.py", *common, "--name", "t")
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    res = json.loads((out / "t.json").read_text())
    assert set(res["recall"]) == {"base", "in-context", "sleep", "naive-sft"}
    assert res["memories"] == 3 and res["heldout_probes"] >= 6
    assert res["seed"]["steps"] == 4 and res["seed"]["peak_memory_mb"] > 0
    assert res["seed_dream"] is not None and "message" in res["seed_dream"]
    text = r.stdout.decode()
    for word in ("base (closed-book)", "in-context", "naive SFT", "seed", "ppl change", "rollout tokens/s"):
        assert word in text
    # a second call on the same home reuses the seed and its evaluation
    r2 = script("bench.py", *common, "--name", "t2", "--home", str(out / "t" / "home"), "--no-dream")
    assert r2.returncode == 0, r2.stderr.decode()[-3000:]
    again = json.loads((out / "t2.json").read_text())
    assert again["recall"] == res["recall"] and Path(again["seed"]["run_dir"]) == Path(res["seed"]["run_dir"])


def test_gpu_bench_runs_at_toy_size(tmp_path):
    """`--tiny` runs the GPU benchmark's whole code path at toy shapes (on CPU here): it keeps working."""
    out = tmp_path / "gpu"
    r = script(
        "gpu_bench.py", "--tiny", "--memories", "3", "--seed-steps", "2", "--seed-engines", "hf", "--out", str(out)
    )
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    res = json.loads(next(out.glob("gpu-bench-*.json")).read_text())
    assert set(res["hf_rollouts"]) == {"0.5b", "1.5b"}
    assert all(v > 0 for x in res["hf_rollouts"].values() for v in x.values())
    assert [s["variant"] for s in res["train_step"]] == ["before", "head", "now"]
    assert all(s["trained_tokens_per_s"] > 0 and s["teacher_scoring_tokens_per_s"] > 0 for s in res["train_step"])
    (seed,) = res["full_seed"]
    assert seed["engine"] == "hf" and seed["steps"] == 2 and seed["memories"] == 3 and seed["wall_s"] > 0
    assert "seed step" in r.stdout.decode() and "full seed" in r.stdout.decode()


def test_gpu_bench_refuses_a_machine_without_cuda(tmp_path):
    import torch

    if torch.cuda.is_available():
        import pytest

        pytest.skip("this machine has CUDA")
    r = script("gpu_bench.py", timeout=120)
    assert r.returncode == 2
    assert "no CUDA GPU" in r.stderr.decode()
