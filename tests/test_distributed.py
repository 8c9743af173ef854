"""`seed` on two processes (torchrun, gloo on CPU, a tiny model): one adapter, trained by both, published once."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from sleepctl import record
from sleepctl.errors import RecipeError, SleepError
from sleepctl.memories import open_store

from .conftest import wait_for_lines, write_recipe


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def processes_with(arg: str) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        try:
            if d.isdigit() and arg.encode() in open(f"/proc/{d}/cmdline", "rb").read().split(b"\0"):
                out.append(int(d))
        except OSError:
            pass  # it ended meanwhile
    return out


def torchrun(*args: str, procs: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs)]
    cmd += ["--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "sleepctl", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="200")
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)


def test_seed_on_two_processes_publishes_one_adapter_both_trained(tmp_path, tiny_dir, home, small_memories):
    rcp = write_recipe(tmp_path / "r.yaml", tiny_dir, training={"batch_size": 4, "max_steps": 4})
    record([small_memories], home=home)
    r = torchrun("seed", "--recipe", str(rcp), "--home", str(home), "--json")
    assert r.returncode == 0, r.stderr[-4000:]
    res = json.loads(r.stdout)  # rank 0 alone reports
    assert res["status"] == "done" and res["adapter_version"] == 1 and res["steps"] == 4
    with open_store(home) as st:
        assert [a.version for a in st.adapters()] == [1]
        assert {t.status for t in st.traces()} == {"consolidated"}
    run = home / "runs" / res["run_id"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["processes"] == 2  # and the ranks' weights agreed, or nothing would have been published
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert [x["step"] for x in rows] == [1, 2, 3, 4]  # logged once, by rank 0


def test_two_processes_need_a_batch_to_share_and_seed_alone_trains_across_them(
    tmp_path, tiny_dir, home, small_memories, monkeypatch
):
    rcp = write_recipe(tmp_path / "r.yaml", tiny_dir, training={"batch_size": 1})
    record([small_memories], home=home)
    r = torchrun("seed", "--recipe", str(rcp), "--home", str(home))
    assert r.returncode != 0 and "training.batch_size 1 is smaller than the 2 processes" in r.stderr
    with open_store(home) as st:  # nothing was taken: the memories wait for the next seed
        assert {t.status for t in st.traces()} == {"pending"} and st.adapters() == []
    from sleepctl.consolidate import consolidate
    from sleepctl.dream import dream
    from sleepctl.evaluate import evaluate
    from sleepctl.seed import seed

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RecipeError, match="distributed.strategy"):  # what is not built is refused by name
        seed(str(rcp), home=home, overrides={"distributed.strategy": "fsdp", "training.batch_size": 2})
    for job in (dream, consolidate):
        with pytest.raises(SleepError, match="runs on one process; only `seed` trains across several"):
            job(str(rcp), home=home)
    with pytest.raises(SleepError, match="`eval` runs on one process"):
        evaluate(home=home)


def test_two_processes_killed_resume_from_rank_0s_checkpoint(tmp_path, tiny_dir, home, small_memories):
    """SIGKILL of torchrun and its workers mid-seed; the same command resumes from rank 0's last checkpoint on
    both ranks and publishes one adapter."""
    record([small_memories], home=home)
    rcp = write_recipe(
        tmp_path / "r.yaml", tiny_dir, training={"batch_size": 4, "max_steps": 40, "checkpoint_every": 2}
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    cmd += ["--master_port", str(free_port()), "-m", "sleepctl", "seed", "--recipe", str(rcp), "--home", str(home)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    assert wait_for_lines(home, "seed_*/checkpoints.jsonl", 2), "no checkpoint appeared"
    for pid in processes_with(str(home)):  # torchrun and its workers (each in a session of its own)
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    with open_store(home) as st:
        assert st.current_adapter_id() is None and st.counts()["pending"] == 3
    r = torchrun("seed", "--recipe", str(rcp), "--home", str(home), "--json")
    assert r.returncode == 0, r.stderr[-4000:]
    res = json.loads(r.stdout)
    assert res["resumed_from"] >= 4 and res["adapter_version"] == 1
    with open_store(home) as st:
        assert len(st.runs()) == 1 and st.runs()[0].status == "done"


def test_an_engine_starts_with_its_ranks_gpu_alone_and_without_torchruns_variables(monkeypatch):
    """vLLM's engine process inherits the environment: under torchrun it must see this rank's GPU as its only
    one, and no RANK / LOCAL_RANK that would make it take itself for a rank of a larger group."""
    from sleepctl.distributed import engine_env

    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    env = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "MASTER_PORT": "29500"}
    for k, v in {**env, "CUDA_VISIBLE_DEVICES": "4,6", "TORCHELASTIC_RUN_ID": "x", "KEEP": "me"}.items():
        monkeypatch.setenv(k, v)
    with engine_env():
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "6" and os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "1"
        assert not any(k in os.environ for k in [*env, "TORCHELASTIC_RUN_ID"]) and os.environ["KEEP"] == "me"
        os.environ["SET_BY_THE_ENGINE"] = "1"  # what the engine sets for itself stays
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "4,6" and os.environ["RANK"] == "3"
    assert os.environ["TORCHELASTIC_RUN_ID"] == "x" and "VLLM_ENABLE_V1_MULTIPROCESSING" not in os.environ
    assert os.environ.pop("SET_BY_THE_ENGINE") == "1"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4")  # two ranks on one visible GPU: refused, nothing changed
    with pytest.raises(SleepError, match="local rank 1 has no GPU of its own"):
        with engine_env():
            pass
    assert os.environ["RANK"] == "3"
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process: nothing changes
    with engine_env():
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "4" and os.environ["RANK"] == "3"
