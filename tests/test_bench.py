"""The benchmark script runs end to end and writes its table and JSON (no number is asserted)."""

import json
import subprocess
import sys
from pathlib import Path

from .conftest import ROOT, write_recipe
from .test_dream import DREAM


def test_bench_writes_results(tmp_path, tiny_dir, small_memories):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_dir, dream=DREAM)
    out = tmp_path / "bench"
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "bench.py"),
            "--recipe",
            str(recipe),
            "--memories",
            str(small_memories),
            "--out",
            str(out),
            "--name",
            "t",
        ],
        capture_output=True,
        timeout=900,
    )
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
    r2 = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "bench.py"),
            "--recipe",
            str(recipe),
            "--memories",
            str(small_memories),
            "--out",
            str(out),
            "--name",
            "t2",
            "--home",
            str(out / "t" / "home"),
            "--no-dream",
        ],
        capture_output=True,
        timeout=900,
    )
    assert r2.returncode == 0, r2.stderr.decode()[-3000:]
    again = json.loads((out / "t2.json").read_text())
    assert again["recall"] == res["recall"] and Path(again["seed"]["run_dir"]) == Path(res["seed"]["run_dir"])
