"""The benchmark script runs end to end and writes its table and JSON (no number is asserted)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sleepctl.runs import source_commit
from sleepctl.scoring import contains_match

from .conftest import ROOT, write_recipe
from .test_dream import DREAM


def script(name: str, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run one of scripts/ as a user would."""
    env = dict(os.environ, COLUMNS="200")  # tables as wide as a reader's terminal, not the 80 of a pipe
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / name), *args], capture_output=True, timeout=timeout, env=env
    )


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
    sleep = res["recall"]["sleep"]
    assert sleep["user_probes"] + sleep["teacher_probes"] == res["heldout_probes"]
    assert res["summary"]["recall"]["sleep"]["contains"]["n"] == 1
    assert res["versions"] == json.loads((Path(res["seed"]["run_dir"]) / "versions.json").read_text())
    text = r.stdout.decode()
    for word in ("base (closed-book)", "in-context", "naive SFT", "seed", "ppl change", "rollout tokens/s"):
        assert word in text
    assert "user probes" in text and "teacher probes" in text
    # a second call on the same home reuses the seed and its evaluation
    r2 = script("bench.py", *common, "--name", "t2", "--home", str(out / "t" / "home"), "--no-dream")
    assert r2.returncode == 0, r2.stderr.decode()[-3000:]
    again = json.loads((out / "t2.json").read_text())
    assert again["recall"] == res["recall"] and Path(again["seed"]["run_dir"]) == Path(res["seed"]["run_dir"])


def test_bench_seeds_give_mean_and_spread(tmp_path, tiny_dir, small_memories):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_dir)
    out = tmp_path / "bench"
    common = ("--recipe", str(recipe), "--memories", str(small_memories), "--out", str(out), "--no-dream")
    r = script("bench.py", *common, "--no-baselines", "--seeds", "2", "--name", "s")
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    res = json.loads((out / "s.json").read_text())
    assert res["seeds"] == 2 and len(res["runs"]) == 2
    assert res["runs"][0]["home"] != res["runs"][1]["home"]
    stats = res["summary"]["recall"]["sleep"]["contains"]
    values = [x["recall"]["sleep"]["contains"] for x in res["runs"]]
    assert stats["n"] == 2 and abs(stats["mean"] - sum(values) / 2) < 1e-9
    assert "±" in r.stdout.decode() and res["seeds_done"] == 2
    assert "seed 1: seed recall" in r.stderr.decode() and "user probes" in r.stderr.decode()
    # a run that breaks on its second seed keeps the first one's figures
    (out / "cut" / "home-seed1").parent.mkdir(parents=True)
    (out / "cut" / "home-seed1").write_text("not a home")
    cut = script("bench.py", *common, "--no-baselines", "--seeds", "2", "--name", "cut")
    assert cut.returncode != 0
    kept = json.loads((out / "cut.json").read_text())
    assert kept["seeds"] == 2 and kept["seeds_done"] == 1 and len(kept["runs"]) == 1
    assert kept["summary"]["recall"]["sleep"]["contains"]["n"] == 1
    bad = script("bench.py", *common, "--seeds", "2", "--home", str(tmp_path / "h"), timeout=120)
    assert bad.returncode == 2 and b"one per seed" in bad.stderr

    # seed 5 alone, as a second process on the same GPU would run it, then one table over both files
    r = script(
        "bench.py",
        *common,
        "--no-baselines",
        "--first-seed",
        "5",
        "--name",
        "f",
        "--set",
        "vllm.gpu_memory_utilization=0.1",
    )
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    f = json.loads((out / "f.json").read_text())
    assert [x["training_seed"] for x in f["runs"]] == [5] and f["runs"][0]["home"].endswith("home-seed5")
    trained = yaml.safe_load((Path(f["seed"]["run_dir"]) / "recipe.yaml").read_text())
    assert trained["training"]["seed"] == 5
    m = script("bench.py", "--merge", str(out / "f.json"), str(out / "s.json"), "--out", str(out), "--name", "m")
    assert m.returncode == 0, m.stderr.decode()[-3000:]
    res = json.loads((out / "m.json").read_text())
    assert [x["training_seed"] for x in res["runs"]] == [0, 1, 5] and res["seeds"] == 3
    values = [x["recall"]["sleep"]["contains"] for x in res["runs"]]
    stats = res["summary"]["recall"]["sleep"]["contains"]
    assert stats["n"] == 3 and abs(stats["mean"] - sum(values) / 3) < 1e-9
    assert res["overrides"] == {} and res["engine_shares"][str(out / "f.json")] == {"vllm.gpu_memory_utilization": 0.1}
    assert "training seeds [0, 1, 5]" in m.stdout.decode()
    assert list(res["commits"].values()) == [[0, 1, 5]] and "ran different code" not in m.stdout.decode()
    # seeds made by different code merge, and the table says which code made which seed
    later = json.loads((out / "f.json").read_text())
    later["runs"][0]["versions"] = {**later["runs"][0]["versions"], "commit": "ab" * 20 + "+dirty"}
    (tmp_path / "later.json").write_text(json.dumps(later))
    m = script(
        "bench.py", "--merge", str(out / "s.json"), str(tmp_path / "later.json"), "--out", str(out), "--name", "c"
    )
    assert m.returncode == 0, m.stderr.decode()[-3000:]
    assert json.loads((out / "c.json").read_text())["commits"]["abababababab+dirty"] == [5]
    assert "abababababab+dirty (seeds 5)" in m.stdout.decode() and "these seeds ran different code" in m.stdout.decode()
    # refused, with the reason: a seed twice, another benchmark, a file without training seeds, no file
    dup = script("bench.py", "--merge", str(out / "s.json"), str(out / "s.json"), "--out", str(out), "--name", "x")
    assert dup.returncode != 0 and b"training seed 0 is already in an earlier file" in dup.stderr
    other = json.loads((out / "f.json").read_text()) | {"overrides": {"loss.beta": 0.1}}
    (tmp_path / "other.json").write_text(json.dumps(other))
    bad = script("bench.py", "--merge", str(out / "s.json"), str(tmp_path / "other.json"), "--out", str(out))
    assert bad.returncode != 0 and b"is another benchmark than" in bad.stderr and b"overrides" in bad.stderr
    old = {k: v for k, v in res.items() if k != "runs"} | {
        "runs": [{k: v for k, v in res["runs"][0].items() if k != "training_seed"}]
    }
    (tmp_path / "old.json").write_text(json.dumps(old))
    bad = script("bench.py", "--merge", str(tmp_path / "old.json"), "--out", str(out))
    assert bad.returncode != 0 and b"names no training seed" in bad.stderr
    missing = script("bench.py", "--merge", str(tmp_path / "nowhere.json"), "--out", str(out))
    assert missing.returncode != 0 and b"not a bench.py result" in missing.stderr
    (tmp_path / "dir.json").mkdir()
    (tmp_path / "list.json").write_text("[1, 2]")
    for odd in ("dir.json", "list.json"):
        r = script("bench.py", "--merge", str(tmp_path / odd), "--out", str(out))
        assert r.returncode != 0 and b"not a bench.py result" in r.stderr, odd
    elsewhere = json.loads((out / "f.json").read_text()) | {"machine": "NVIDIA H200 (CUDA), x86_64"}
    (tmp_path / "h200.json").write_text(json.dumps(elsewhere))
    bad = script("bench.py", "--merge", str(out / "s.json"), str(tmp_path / "h200.json"), "--out", str(out))
    assert bad.returncode != 0 and b"machine differ" in bad.stderr
    over = script("bench.py", "--merge", str(out / "f.json"), str(out / "s.json"), "--out", str(out), "--name", "s")
    assert over.returncode != 0 and b"is one of the files merged" in over.stderr
    assert json.loads((out / "s.json").read_text())["seeds"] == 2  # the input is untouched
    assert not (out / "x.json").exists()
    neg = script("bench.py", *common, "--first-seed", "-1", timeout=120)
    assert neg.returncode == 2 and b"--first-seed must be at least 0" in neg.stderr


def test_gpu_bench_runs_at_toy_size(tmp_path):
    """`--tiny` runs the GPU benchmark's whole code path at toy shapes (on CPU here): it keeps working."""
    out = tmp_path / "gpu"
    args = ("--tiny", "--memories", "3", "--seed-steps", "2", "--seed-engines", "hf", "--out", str(out))
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() < 2:  # --tiny runs on the GPU where there is one
        pytest.skip("two processes need two GPUs on a machine with CUDA")
    r = script("gpu_bench.py", *args, "--gpus", "1,2")
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    res = json.loads(next(out.glob("gpu-bench-*.json")).read_text())
    assert set(res["hf_rollouts"]) == {"0.5b", "1.5b"}
    assert all(v > 0 for x in res["hf_rollouts"].values() for v in x.values())
    assert [s["variant"] for s in res["train_step"]] == ["before", "head", "bf16", "fused", "compiled"]
    assert all(s["trained_tokens_per_s"] > 0 and s["teacher_scoring_tokens_per_s"] > 0 for s in res["train_step"])
    one, two = res["full_seed"]  # the same seed in one process, then in two under torchrun
    assert [one["gpus"], two["gpus"]] == [1, 2] and one["examples"] == two["examples"]
    for seed in (one, two):
        assert seed["engine"] == "hf" and seed["steps"] == 2 and seed["memories"] == 3 and seed["wall_s"] > 0
        assert seed["sequences_per_s"] > 0 and seed["train_tflops_per_gpu"] > 0
    assert len(two["trainer_peak_memory_mb_per_rank"]) == 2
    text = r.stdout.decode()
    assert "seed step" in text and "full seed" in text and "2 GPUs against 1" in text
    # by default the real night is measured where it can run; at toy size it says why it did not
    assert "full_night" not in res and res["night_skipped"].startswith("--tiny")
    bad = script("gpu_bench.py", *args, "--parts", "night", timeout=120)
    assert bad.returncode == 2 and b"--parts night cannot run here: --tiny" in bad.stderr
    for bad_count in ("0", "1,x"):
        bad = script("gpu_bench.py", *args, "--gpus", bad_count, timeout=120)
        assert bad.returncode == 2 and f"--gpus {bad_count}: give process counts from 1".encode() in bad.stderr
    for flag, value in (("--variants", "fused,fast"), ("--train-batches", "16,0")):
        bad = script("gpu_bench.py", *args, flag, value, timeout=120)
        assert bad.returncode == 2 and b"--variants takes before, head, bf16, fused, compiled" in bad.stderr
    bad = script("gpu_bench.py", *args, "--student", "7b", "--seed-models", "real", timeout=120)
    assert bad.returncode == 2 and b"--seed-models real trains the real 1.5B" in bad.stderr


def test_gpu_bench_refuses_a_machine_without_cuda(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    r = script("gpu_bench.py", timeout=120)
    assert r.returncode == 2
    assert "no CUDA GPU" in r.stderr.decode()


def test_bench_nights_retention_matrix_and_plot(tmp_path, tiny_dir):
    """Two nights (the second corrects the first) under two configurations: table, JSON, PNG."""
    nights = tmp_path / "nights"
    nights.mkdir()
    src = (ROOT / "benchmarks" / "nights" / "night1.jsonl").read_text().splitlines()
    (nights / "night1.jsonl").write_text("\n".join(src[:3]) + "\n")
    first = json.loads(src[0])
    q = first["probes"][0]["question"]
    fix = {
        "text": f"Update: the answer to '{q}' is now Zanzibarre-77.",
        "probes": [
            {"question": q, "answer": "Zanzibarre-77"},
            {"question": "What is the update code?", "answer": "77"},
        ],
        "corrects": q,
    }
    other = json.loads((ROOT / "benchmarks" / "nights" / "night2.jsonl").read_text().splitlines()[1])
    other.pop("corrects", None)
    (nights / "night2.jsonl").write_text(json.dumps(fix) + "\n" + json.dumps(other) + "\n")
    recipe = write_recipe(
        tmp_path / "r.yaml",
        tiny_dir,
        anchor={"kl_coef": 0.5, "batch_size": 2, "max_tokens": 24, "drift_prompts": 4},
        consolidate={"max_adapters": 1, "steps_per_memory": 1.0, "max_steps": 4},
    )
    out = tmp_path / "out"
    args = (
        *("--recipe", str(recipe), "--nights-dir", str(nights), "--nights", "2", "--configs", "stack,full"),
        *("--out", str(out), "--name", "t"),
    )
    cut = script("bench_nights.py", *args, "--max-minutes", "0.00001")  # out of time before the first night
    assert cut.returncode == 0 and b"continue with the same command and --resume" in cut.stderr
    assert json.loads((out / "t" / "results.json").read_text())["runs"][0]["nights"] == []
    wrong = script("bench_nights.py", *args[2:], "--recipe", "quick-cpu", "--resume")
    assert wrong.returncode != 0 and b"ran recipe" in wrong.stderr
    r = script("bench_nights.py", *args, "--resume", "--set", "eval.max_new_tokens=16")
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    res = json.loads((out / "t" / "results.json").read_text())
    # the settings a resumed night ran under, where they differ from those the results began with
    assert all(row["overrides_changed"] == {"eval.max_new_tokens": 16} for x in res["runs"] for row in x["nights"])
    assert [x["config"] for x in res["runs"]] == ["stack", "full"]
    # the code each run started with; resumed by the same code, no night notes another
    assert all(x["versions"].get("commit") == source_commit() for x in res["runs"]) and "code: " in r.stdout.decode()
    assert not any("commit" in row for x in res["runs"] for row in x["nights"])
    for run in res["runs"]:
        rows = run["nights"]
        assert [x["night"] for x in rows] == [1, 2]
        assert set(rows[0]["recall"]) == {"1"} and set(rows[1]["recall"]) == {"1", "2"}  # the retention matrix
        assert rows[1]["updates_checked"] == 1 and rows[0]["updates_checked"] == 0
        (ans,) = rows[1]["update_answers"]  # what the model said to the corrected question, beside both values
        assert ans["question"] == q and ans["latest"] == "Zanzibarre-77" and ans["corrected_on"] == 2
        assert ans["is_latest"] == contains_match(ans["output"], "Zanzibarre-77") and rows[0]["update_answers"] == []
        # night 2 rewrote the corrected memory's answers; what they carry is counted (night 1 rewrote nothing)
        assert rows[0]["rewrites"] == {"examples": 0, "stale": 0, "latest": 0, "both": 0}
        rw = rows[1]["rewrites"]
        if run["config"] == "full":
            assert rw["examples"] >= 1 and rw["stale"] + rw["latest"] + rw["both"] <= rw["examples"]
        else:  # the old way links no memories, so nothing is rewritten
            assert rw["examples"] == 0
        assert rows[1]["kl_drift"] is not None and rows[1]["wall_s"] > 0
    full = res["runs"][1]["nights"]
    assert full[1]["stack_depth"] == 1 and full[1]["consolidation"] is not None  # 2 > max_adapters: consolidated
    assert res["runs"][0]["nights"][1]["stack_depth"] == 2  # the old way: the stack only grows
    assert set(res["summary"]) == {"stack", "full"} and res["summary"]["full"]["night1_after_last"] is not None
    assert (out / "t" / "retention.png").stat().st_size > 1000
    assert "night 1: after 1" in r.stdout.decode()


def test_bench_nights_merges_runs_made_apart(tmp_path):
    """Seeds run as separate processes (side by side on one GPU) become one table with mean ± sd; runs of
    another benchmark, or the same seed twice, are refused with the reason."""
    real = json.loads((ROOT / "benchmarks" / "results" / "nights-h100-tuned" / "results.json").read_text())
    for seed in (0, 1):
        part = json.loads(json.dumps(real))
        part["runs"][0]["seed"] = seed
        if seed == 1:  # another night-1 recall, so the spread is not zero
            part["runs"][0]["nights"][-1]["recall"]["1"] = 0.5
        (tmp_path / f"s{seed}").mkdir()
        (tmp_path / f"s{seed}" / "results.json").write_text(json.dumps(part))
    out = tmp_path / "out"
    r = script(
        "bench_nights.py", "--merge", str(tmp_path / "s0"), str(tmp_path / "s1"), "--out", str(out), "--name", "m"
    )
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    res = json.loads((out / "m" / "results.json").read_text())
    after = res["summary"]["full"]["night1_after_last"]
    assert after["n"] == 2 and abs(after["mean"] - (2 / 3 + 0.5) / 2) < 1e-9 and after["sd"] > 0.1
    assert [x["seed"] for x in res["runs"]] == [0, 1] and (out / "m" / "retention.png").stat().st_size > 1000
    assert "merged from 2 runs" in r.stdout.decode()
    assert res["commits"] == {"unknown": [0, 1]}  # written before runs recorded their code

    # a run stopped early (--max-minutes): the summary is taken after the last night both reached
    short = json.loads((tmp_path / "s1" / "results.json").read_text())
    short["runs"][0]["nights"] = short["runs"][0]["nights"][:3]
    short["runs"][0]["seed"] = 2
    short["runs"][0]["nights"][-1]["commit"] = "abababababab"  # its last night resumed under other code
    (tmp_path / "s2").mkdir()
    (tmp_path / "s2" / "results.json").write_text(json.dumps(short))
    r = script(
        "bench_nights.py", "--merge", *(str(tmp_path / f"s{i}") for i in (0, 2)), "--out", str(out), "--name", "c"
    )
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    summ = json.loads((out / "c" / "results.json").read_text())["summary"]["full"]
    assert json.loads((out / "c" / "results.json").read_text())["commits"] == {"unknown": [0, 2], "abababababab": [2]}
    assert "these seeds may have run different code" in r.stdout.decode()
    night3 = real["runs"][0]["nights"][2]
    assert summ["after_night"] == 3 and summ["night1_after_last"]["sd"] == 0.0
    assert summ["night1_after_last"]["mean"] == night3["recall"]["1"] and summ["night_wall_max_s"]["n"] == 2
    assert (out / "c" / "retention.png").stat().st_size > 1000

    # a seed that shared its GPU ran with smaller engine memory shares: the same benchmark, its shares kept
    shared = json.loads((tmp_path / "s2" / "results.json").read_text())
    shared["overrides"] = {**shared["overrides"], "vllm.gpu_memory_utilization": 0.12}
    (tmp_path / "s2" / "results.json").write_text(json.dumps(shared))
    r = script(
        "bench_nights.py", "--merge", *(str(tmp_path / f"s{i}") for i in (0, 2)), "--out", str(out), "--name", "d"
    )
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    res = json.loads((out / "d" / "results.json").read_text())
    assert res["overrides"] == real["overrides"]
    assert res["engine_shares"][str(tmp_path / "s2" / "results.json")] == {"vllm.gpu_memory_utilization": 0.12}

    dup = script("bench_nights.py", "--merge", str(tmp_path / "s0"), str(tmp_path / "s0"), "--out", str(out))
    assert dup.returncode != 0 and b"full seed 0 is already in an earlier file" in dup.stderr
    other = json.loads((tmp_path / "s1" / "results.json").read_text()) | {"overrides": {"engine": "hf"}}
    (tmp_path / "s1" / "results.json").write_text(json.dumps(other))
    bad = script("bench_nights.py", "--merge", str(tmp_path / "s0"), str(tmp_path / "s1"), "--out", str(out))
    assert bad.returncode != 0 and b"is another benchmark than" in bad.stderr and b"overrides" in bad.stderr
    missing = script("bench_nights.py", "--merge", str(tmp_path / "nowhere"), "--out", str(out))
    assert missing.returncode != 0 and b"not a bench_nights results.json" in missing.stderr
    neg = script("bench_nights.py", "--first-seed", "-1", "--out", str(out))
    assert neg.returncode == 2 and b"--first-seed at least 0" in neg.stderr
    assert sorted(p.name for p in out.iterdir()) == ["c", "d", "m"]  # refused before any folder was made
