"""Knowledge Seeding end to end on tiny random-weight models: adapters, registry, resume, failure paths."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sleepctl import record
from sleepctl.errors import ModelError, SleepError
from sleepctl.memories import open_store
from sleepctl.seed import Interrupted, seed

from .conftest import EXAMPLES, cli, sigint_default, wait_for_lines, write_recipe


def _metrics(run_dir) -> list[dict]:
    return [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_seed_writes_adapter_registry_and_marks_memories(home, tmp_path, tiny_dir, small_memories):
    record([small_memories], home=home)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_dir)
    res = seed(str(recipe), home=home, show_progress=False)
    assert res.status == "done" and res.adapter_version == 1 and res.steps == 4 and res.tokenizers == "identical"
    rows = _metrics(res.run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(
        k in rows[0] for k in ("loss", "train/kd_loss", "train/lti_loss", "reward/mean", "lmbda", "lr", "grad_norm")
    )
    assert rows[0]["lmbda"] == 0.0 and rows[-1]["lmbda"] == 0.5  # ramps from 0 over lmbda_warmup_steps
    run = Path(res.run_dir)
    for f in ("recipe.yaml", "versions.json", "memory_ids.json", "data.json", "summary.json"):
        assert (run / f).exists(), f
    from sleepctl.runs import _LOADED_FROM

    code = json.loads((run / "versions.json").read_text())
    assert code["transformers"] and code.get("commit") == _LOADED_FROM  # the checkout's commit, or none
    with open_store(home) as st:
        a = st.adapter(res.adapter_id)
        assert a.current and a.base_model == str(tiny_dir) and len(a.trace_ids) == 3
        assert st.counts()["pending"] == 0
        assert all(t.adapter_id == a.id for t in st.traces())
        teacher_probes = st.probes(origin="teacher")
    data = json.loads((run / "data.json").read_text())
    heldout = {p["question"] for p in data["probes"] if p["split"] == "heldout"}
    user = {json.loads(line)["probes"][0]["question"] for line in small_memories.read_text().splitlines()}
    assert not ({e["prompt"] for e in data["examples"]} & (heldout | user))  # held-out probes never train
    assert all(p.origin == "teacher" for p in teacher_probes)
    # a PEFT adapter in safetensors, loadable by PeftModel.from_pretrained
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert (Path(a.path) / "adapter_model.safetensors").exists()
    m = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), a.path)
    assert any("lora_A" in n for n, _ in m.named_parameters())


def test_seed_with_training_compile_trains_through_compiled_blocks(
    home, tmp_path, tiny_dir, small_memories, monkeypatch, dynamo_clean
):
    """`training.compile`: the seed compiles the student's blocks before its loop, trains through them and
    records how many it compiled (a counting backend stands in for inductor's minutes of C++ here)."""
    import sleepctl.seed as seed_mod
    from sleepctl.training import compile_layers

    calls = []

    def counting(gm, example_inputs):
        def run(*a):
            calls.append(1)
            return gm.forward(*a)

        return run

    monkeypatch.setattr(seed_mod, "compile_layers", lambda model: compile_layers(model, backend=counting))
    record([small_memories], home=home)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_dir)
    res = seed(str(recipe), home=home, show_progress=False, overrides={"training.compile": True})
    assert res.status == "done" and res.steps == 4
    summary = json.loads((Path(res.run_dir) / "summary.json").read_text())
    assert summary["engine"]["compiled_layers"] == 2  # the tiny student's two blocks
    assert len(calls) >= 4 * 2 * 2  # four steps, two blocks, the teacher's and the student's forward at least
    assert len(_metrics(res.run_dir)) == 4


def test_nothing_to_consolidate(home, tmp_path, tiny_dir, small_memories):
    record([small_memories], home=home)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_dir)
    seed(str(recipe), home=home, show_progress=False)
    res = seed(str(recipe), home=home, show_progress=False)
    assert res.status == "nothing" and "nothing to consolidate" in res.message
    r = cli("seed", "--recipe", str(recipe), "--home", str(home))
    assert r.returncode == 0 and b"nothing to consolidate" in r.stdout


def test_second_night_stacks_on_frozen_first(home, tmp_path, tiny_dir, small_memories):
    record([small_memories], home=home)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_dir)
    first = seed(str(recipe), home=home, show_progress=False)
    with open_store(home) as st:
        p1 = Path(st.adapter(first.adapter_id).path) / "adapter_model.safetensors"
    before = p1.read_bytes()
    more = tmp_path / "more.jsonl"
    more.write_text("\n".join(EXAMPLES.read_text().splitlines()[3:5]) + "\n")
    record([more], home=home)
    second = seed(str(recipe), home=home, show_progress=False)
    assert second.adapter_version == 2 and second.memories == 2
    assert p1.read_bytes() == before  # the first adapter is frozen
    with open_store(home) as st:
        from sleepctl.adapters import lineage, rollback

        a2 = st.adapter(second.adapter_id)
        assert a2.parent_id == first.adapter_id and [a.version for a in lineage(st, a2.id)] == [1, 2]
        assert rollback(st).id == first.adapter_id and st.current_adapter_id() == first.adapter_id
        assert st.counts()["pending"] == 2  # the rolled-back night's memories wait for the next seed
        assert rollback(st, "v2").id == second.adapter_id and st.counts()["pending"] == 0
        assert rollback(st, "base") is None and st.current_adapter_id() is None
        assert st.counts()["pending"] == 5


def test_reseed_after_rollback_reuses_teacher_data(home, tmp_path, tiny_dir, small_memories):
    record([small_memories], home=home)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_dir)
    first = seed(str(recipe), home=home, show_progress=False)
    r = cli("adapters", "rollback", "--home", str(home), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["current"] is None
    again = seed(str(recipe), home=home, show_progress=False, overrides={"loss.divergence": "forward_kl"})
    assert again.adapter_version == 2 and again.memories == 3
    a = json.loads((Path(first.run_dir) / "data.json").read_text())
    b = json.loads((Path(again.run_dir) / "data.json").read_text())
    assert a == b  # same memories, teacher and data knobs: the cached teacher data, not a new draw


def test_resume_matches_straight_run(tmp_path, tiny_dir, small_memories, monkeypatch):
    """N steps straight == N/2, interrupt, resume, N/2: same losses (torchtune's resume test)."""
    recipe = write_recipe(tmp_path / "r.yaml", tiny_dir)
    straight_home, resumed_home = tmp_path / "a", tmp_path / "b"
    record([small_memories], home=straight_home)
    record([small_memories], home=resumed_home)
    straight = _metrics(seed(str(recipe), home=straight_home, show_progress=False).run_dir)

    import sleepctl.loop as seed_mod  # the one loop writes every checkpoint

    real = seed_mod.save_checkpoint

    stopped = []

    def save_then_stop(rf, step, *a, **kw):
        real(rf, step, *a, **kw)
        if not stopped:
            stopped.append(step)
            raise KeyboardInterrupt  # as if Ctrl-C came right after the checkpoint at step 2

    monkeypatch.setattr(seed_mod, "save_checkpoint", save_then_stop)
    with pytest.raises(Interrupted, match="after step 2"):
        seed(str(recipe), home=resumed_home, show_progress=False)
    monkeypatch.setattr(seed_mod, "save_checkpoint", real)
    with open_store(resumed_home) as st:
        assert st.runs()[0].status == "interrupted" and st.counts()["adapters"] == 0
    res = seed(str(recipe), home=resumed_home, show_progress=False)
    assert res.resumed_from == 2
    resumed = _metrics(res.run_dir)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(straight, resumed):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6)


def test_sigkill_then_same_command_resumes(home, tmp_path, tiny_dir, small_memories):
    record([small_memories], home=home)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_dir, training={"max_steps": 40, "checkpoint_every": 2})
    args = [sys.executable, "-m", "sleepctl.cli", "seed", "--recipe", str(recipe), "--home", str(home)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert wait_for_lines(home, "seed_*/checkpoints.jsonl", 2), "no checkpoint appeared"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with open_store(home) as st:
        assert st.current_adapter_id() is None and st.counts()["pending"] == 3
    r = cli("seed", "--recipe", str(recipe), "--home", str(home), "--json")
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    res = json.loads(r.stdout)
    assert res["resumed_from"] >= 4 and res["adapter_version"] == 1
    with open_store(home) as st:
        assert len(st.runs()) == 1 and st.runs()[0].status == "done"


def test_ctrl_c_exits_130_and_resumes(home, tmp_path, tiny_dir, small_memories):
    record([small_memories], home=home)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_dir, training={"max_steps": 200, "checkpoint_every": 1000})
    proc = subprocess.Popen(
        [sys.executable, "-m", "sleepctl.cli", "seed", "--recipe", str(recipe), "--home", str(home)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=sigint_default,
    )
    assert wait_for_lines(home, "seed_*/metrics.jsonl", 2), "no step was logged"
    proc.send_signal(signal.SIGINT)
    _, errb = proc.communicate(timeout=120)
    assert proc.returncode == 130, errb.decode()[-2000:]
    assert b"run the same command again to resume" in errb
    run = next((home / "runs").glob("seed_*"))
    assert list((run / "checkpoints").glob("step-*")), "Ctrl-C saved no checkpoint"


def test_disk_full_keeps_current_adapter(home, tmp_path, tiny_dir, small_memories, monkeypatch):
    record([small_memories], home=home)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_dir)
    first = seed(str(recipe), home=home, show_progress=False)
    more = tmp_path / "more.jsonl"
    more.write_text(EXAMPLES.read_text().splitlines()[5] + "\n")
    record([more], home=home)
    from peft import PeftModel

    def full(self, path, **kw):
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "adapter_model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PeftModel, "save_pretrained", full)
    with pytest.raises(SleepError, match="No space left on device") as e:
        seed(str(recipe), home=home, show_progress=False)
    assert "current adapter is unchanged" in e.value.hint
    with open_store(home) as st:
        assert st.current_adapter_id() == first.adapter_id
        assert st.counts()["pending"] == 1 and st.counts()["adapters"] == 1
    assert not list((home / "adapters").glob(".tmp-*"))


def test_tokenizers_differ(home, tmp_path, tiny_dir, tiny_other_tok_dir, small_memories):
    record([small_memories], home=home)
    recipe = write_recipe(
        tmp_path / "r.yaml",
        tiny_dir,
        teacher="small",
        profiles={"small": {"model": str(tiny_other_tok_dir)}, "large": {"model": str(tiny_dir)}},
    )
    with pytest.raises(ModelError, match="different tokenizers") as e:
        seed(str(recipe), home=home, show_progress=False)
    assert "alpha: 0" in e.value.hint
    r = cli("seed", "--recipe", str(recipe), "--home", str(home))
    assert r.returncode == 1 and b"different tokenizers" in r.stderr
    # Learning to Imitate alone works on text, across tokenizers
    res = seed(str(recipe), home=home, show_progress=False, overrides={"loss.alpha": 0.0})
    assert res.status == "done" and "train/kd_loss" not in res.final and "reward/mean" in res.final


def test_bad_inputs(home, tmp_path, tiny_dir, small_memories):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_dir)
    r = cli("seed", "--recipe", str(recipe), "--home", str(tmp_path / "nohome"))
    assert r.returncode == 1 and b"no sleepctl home" in r.stderr
    record([small_memories], home=home)
    r = cli("seed", "--recipe", str(recipe), "--home", str(home), "--teacher", "medium")
    assert r.returncode == 2 and b"unknown teacher profile 'medium'" in r.stderr
    r = cli("seed", "--recipe", str(recipe), "--home", str(home), "--set", "loss.lmbda=1.5")
    assert r.returncode == 2 and b"loss.lmbda" in r.stderr
    r = cli("seed", "--recipe", str(recipe), "--home", str(home), "--student", str(tmp_path))
    assert r.returncode == 1 and b"without config.json" in r.stderr
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama"}')
    r = cli("seed", "--recipe", str(recipe), "--home", str(home), "--student", str(broken))
    assert r.returncode == 1 and b"cannot load" in r.stderr and b"Traceback" not in r.stderr
    with open_store(home) as st:
        assert st.counts()["pending"] == 3  # nothing lost by the failures


def test_deterministic_seed(tmp_path, tiny_dir, small_memories):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_dir)
    outs = []
    for name in ("x", "y"):
        h = tmp_path / name
        record([small_memories], home=h)
        outs.append([r["loss"] for r in _metrics(seed(str(recipe), home=h, show_progress=False).run_dir)])
    assert outs[0] == pytest.approx(outs[1], rel=1e-5)
    assert torch.isfinite(torch.tensor(outs[0])).all()


def test_teacher_answers_left_out_are_counted_and_listed(home, tmp_path, tiny_dir, small_memories):
    """A random model's answers ground nothing: with data.grounded_only on, the seed says how many it left out and
    why, and the run's data.json lists each one, so a user can read what the filter took."""
    record([small_memories], home=home)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_dir)
    r = cli("seed", "--recipe", str(recipe), "--home", str(home), "--set", "data.grounded_only=true", "--json")
    assert r.returncode in (0, 3), r.stderr.decode()[-1500:]
    assert b"teacher answers left out as not grounded in the memory" in r.stderr
    run = Path(json.loads(r.stdout)["run_dir"])
    dropped = json.loads((run / "data.json").read_text())["dropped"]
    assert dropped and all(set(x) == {"trace_id", "prompt", "answer", "why"} for x in dropped)
    assert all(x["why"] == "not grounded" or x["why"].startswith("states ") for x in dropped)
    trained = {(e["prompt"], s) for e in json.loads((run / "data.json").read_text())["examples"] for s in e["samples"]}
    assert not trained & {(x["prompt"], x["answer"]) for x in dropped}  # nothing left out is trained


def test_source_commit_names_the_checkout_sleepctl_runs_from(tmp_path, monkeypatch):
    """The package version does not change between commits: a run records the source commit, marked dirty when
    tracked files differ, and none for a copy that is not the top of a checkout (an installed package)."""
    from sleepctl.runs import source_commit

    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    monkeypatch.delenv("SLEEPCTL_SOURCE_COMMIT", raising=False)
    repo = tmp_path / "repo"
    assert source_commit(tmp_path) is None  # not a checkout at all
    (repo / "sleepctl").mkdir(parents=True)
    (repo / "sleepctl" / "a.py").write_text("x = 1\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")} | {"GIT_CONFIG_GLOBAL": os.devnull}

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false", *args],
            check=True,
            capture_output=True,
            text=True,
            env=env,
        ).stdout.strip()

    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "one")
    head = git("rev-parse", "HEAD")
    assert source_commit(repo) == head
    (repo / "notes.txt").write_text("untracked files do not make it dirty")
    assert source_commit(repo) == head
    (repo / "sleepctl" / "a.py").write_text("x = 2\n")
    assert source_commit(repo) == head + "+dirty"
    assert source_commit(repo / "sleepctl") is None  # inside a checkout, not its top: another project's code
    monkeypatch.setenv("GIT_DIR", str(repo / ".git"))  # as inside a git hook: it must not make tmp_path that repo
    assert source_commit(tmp_path) is None
    # a copy of the tree without its repository, told its commit; a checkout's own HEAD wins over the variable
    monkeypatch.setenv("SLEEPCTL_SOURCE_COMMIT", "c0ffee")
    assert source_commit(tmp_path) == "c0ffee" and source_commit(repo) == head + "+dirty"


def test_a_run_names_the_commit_its_process_loaded_not_where_the_checkout_moved_since(monkeypatch):
    """scripts/bench.py runs three seeds in one process: a commit made meanwhile is not the code they run."""
    from sleepctl import runs

    loaded = runs.versions().get("commit")
    monkeypatch.setattr(runs, "source_commit", lambda root=None: "f" * 40)  # the checkout's HEAD moved on
    assert runs.versions().get("commit") == loaded != "f" * 40
