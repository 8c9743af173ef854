"""Run folders and checkpoints (the adapter registry lives in adapters.py).

A run folder holds the resolved recipe, versions, memory ids, metrics.jsonl, an append-only
checkpoints.jsonl and the checkpoints themselves (adapter weights as safetensors; optimizer and
schedule state loaded with `weights_only`, so a tampered checkpoint cannot run code).

A job that dies (killed, or the disk full) can leave its run `running` and temporary or unregistered
folders behind; the next job sweeps them under the home's lock (`sweep`), and the same command resumes.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import platform
import random
import re
import shutil
import sqlite3
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import BaseModel

from .errors import SleepError
from .home import Home
from .records import Run
from .store import Store, new_id, now


def versions() -> dict[str, str]:
    """What produced a run: library versions, and the source commit where sleepctl runs from a git checkout (the
    package version alone does not change between commits, so two runs of "0.1.0" may be different code). The
    commit is the checkout's when this process imported sleepctl: three seeds of scripts/bench.py in one process
    run the code they imported, whatever is committed meanwhile (a module first imported later, such as the vLLM
    engine, would be read from the checkout as it is then)."""
    import importlib.metadata

    import peft
    import transformers

    from . import __version__

    out = {
        "sleepctl": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "platform": platform.platform(),
    }
    try:
        out["vllm"] = importlib.metadata.version("vllm")  # its metadata only: importing vLLM takes seconds
    except importlib.metadata.PackageNotFoundError:
        pass
    if commit := _LOADED_FROM or os.environ.get("SLEEPCTL_SOURCE_COMMIT"):  # the variable, if set after import
        out["commit"] = commit
    return out


def source_commit(root: Path | None = None) -> str | None:
    """HEAD of the git checkout sleepctl runs from, "+dirty" when its tracked files differ from it; None for an
    installed package, or without git. Only a checkout whose top is the folder holding the package counts: an
    installed copy inside some other repository (a venv in a project) is not that repository's code. A copy of the
    tree without its repository (sent to another machine) may name its commit in SLEEPCTL_SOURCE_COMMIT."""
    import subprocess

    root = root or Path(__file__).resolve().parent.parent
    told = os.environ.get("SLEEPCTL_SOURCE_COMMIT") or None

    # GIT_DIR and the like (set inside git hooks) would point git at another repository; a clone owned by another
    # user is still this code (safe.directory); several runs side by side must not take the index lock (status)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    cmd = ["git", "--no-optional-locks", "-c", f"safe.directory={root}", "-C", str(root)]

    def git(*args: str) -> str | None:
        try:
            r = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=10, env=env)
        except (OSError, subprocess.SubprocessError):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")
    if not top or Path(top).resolve() != root.resolve():
        return told
    head = git("rev-parse", "HEAD")
    if not head:
        return told
    status = git("status", "--porcelain", "--untracked-files=no")
    return head + ("+dirty" if status != "" else "")  # a status that failed does not vouch for a clean tree


_LOADED_FROM = source_commit()


def config_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


class MetricsLog:
    """Append-only JSONL; flushed per line so a SIGKILL loses at most the line being written."""

    def __init__(self, path: Path):
        self.path = path

    def log(self, row: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def rows(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().split("\n"):  # "\n" only: JSONL strings may hold a raw U+2028
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line torn by a kill: everything before it is good
        return out


@dataclass
class RunFolder:
    run: Run
    path: Path

    @property
    def metrics(self) -> MetricsLog:
        return MetricsLog(self.path / "metrics.jsonl")

    @property
    def ckpt_dir(self) -> Path:
        return self.path / "checkpoints"


def start_run(
    home: Home, st: Store, kind: str, recipe: dict, memory_ids: list[str], extra: dict | None = None
) -> RunFolder:
    run_id = new_id(kind)
    path = home.run_dir(run_id)
    key = {"kind": kind, "recipe": config_hash(recipe), "memories": config_hash(memory_ids), **(extra or {})}
    try:
        path.mkdir(parents=True)
        (path / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
        (path / "versions.json").write_text(json.dumps(versions(), indent=2))
        (path / "memory_ids.json").write_text(json.dumps(memory_ids))
        (path / "resume_key.json").write_text(json.dumps(key))
    except OSError as e:
        shutil.rmtree(path, ignore_errors=True)
        raise SleepError(f"cannot start a {kind} run in {path}: {e.strerror or e}", hint=_hint(e)) from e
    run = Run(id=run_id, kind=kind, status="running", dir=str(path), started_at=now())
    st.insert_run(run)
    return RunFolder(run, path)


def find_resumable(
    home: Home, st: Store, kind: str, recipe: dict, memory_ids: list[str], extra: dict | None = None
) -> RunFolder | None:
    """An unfinished run of the same recipe and memories: the same command after a kill picks it up."""
    key = {"kind": kind, "recipe": config_hash(recipe), "memories": config_hash(memory_ids), **(extra or {})}
    for run in reversed(st.runs(kind)):
        if run.status not in ("running", "interrupted", "failed"):
            continue
        p = Path(run.dir)
        kf = p / "resume_key.json"
        if kf.exists() and json.loads(kf.read_text()) == key:
            return RunFolder(run, p)
    return None


class TrainState(BaseModel):
    """What resume needs beside the weights: typed, so a bad one fails loudly (STYLE.md)."""

    step: int
    seed: int
    tokens_trained: int = 0
    rng_python: Any = None


def save_checkpoint(
    rf: RunFolder, step: int, adapter_state: dict[str, torch.Tensor], optimizer, scheduler, state: TrainState
) -> Path:
    from safetensors.torch import save_file

    final = rf.ckpt_dir / f"step-{step:06d}"
    tmp = rf.ckpt_dir / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in adapter_state.items()}, tmp / "adapter.safetensors")
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optim.pt")
    (tmp / "state.json").write_text(state.model_dump_json())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    with open(rf.path / "checkpoints.jsonl", "a") as f:
        f.write(json.dumps({"step": step, "path": final.name, "time": now()}) + "\n")
    # keep the two newest: enough to survive a kill during a save, small on disk
    olds = sorted(p for p in rf.ckpt_dir.glob("step-*"))[:-2]
    for p in olds:
        shutil.rmtree(p, ignore_errors=True)
    return final


def latest_checkpoint(rf: RunFolder) -> Path | None:
    cands = sorted(p for p in rf.ckpt_dir.glob("step-*") if (p / "state.json").exists() and (p / "optim.pt").exists())
    return cands[-1] if cands else None


def load_checkpoint(path: Path, model, optimizer, scheduler) -> TrainState:
    from safetensors.torch import load_file

    sd = load_file(path / "adapter.safetensors")
    params = dict(model.named_parameters())
    for k, v in sd.items():
        params[k].data.copy_(v.to(params[k].device, params[k].dtype))
    try:
        opt = torch.load(path / "optim.pt", weights_only=True)  # a home can be copied and shared: never unpickle code
    except Exception as e:  # noqa: BLE001 - any refusal or corruption is the same answer
        raise SleepError(
            f"checkpoint {path} holds something other than optimizer state and was not loaded: {str(e)[:200]}",
            hint=f"remove {path} to resume from an earlier checkpoint, or start the run again",
        ) from e
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    return TrainState.model_validate_json((path / "state.json").read_text())


@contextmanager
def run_status(st: Store, rf: RunFolder, summary: dict | None = None):
    """A run that ends by an exception is marked failed (interrupted for Ctrl-C), so it never stays `running`
    (if even that cannot be written, the disk being full, the next job's `sweep` marks it). A failed file
    write (a full disk) is one line, not a traceback."""
    from .errors import EXIT_INTERRUPTED

    try:
        yield
    except KeyboardInterrupt:
        _end(st, rf, "interrupted", summary)
        raise
    except SleepError as e:
        _end(st, rf, "interrupted" if e.exit_code == EXIT_INTERRUPTED else "failed", summary)
        raise
    except OSError as e:
        _end(st, rf, "failed", {**(summary or {}), "error": str(e)[:500]})
        where = f" ({e.filename})" if e.filename else ""
        raise SleepError(f"{rf.run.kind} run {rf.run.id} failed: {e.strerror or e}{where}", hint=_hint(e)) from e
    except BaseException as e:
        _end(st, rf, "failed", {**(summary or {}), "error": str(e)[:500]})
        raise


def _end(st: Store, rf: RunFolder, status: str, summary: dict | None) -> None:
    try:
        st.update_run(rf.run.id, status, summary)
    except (sqlite3.Error, SleepError):
        pass  # the store cannot be written now; `sweep` marks the run failed at the next start


def _hint(e: OSError) -> str:
    if e.errno == errno.ENOSPC:
        return "free disk space in the home; the next run clears what this one left, and the same command resumes"
    return "the same command resumes from the last checkpoint"


# --- what a dead job left behind ---------------------------------------------------------------------------

_RUN_DIR = re.compile(r"^(seed|dream|consolidate)_[0-9a-f]+$")
_ADAPTER_DIR = re.compile(r"^v\d+-(a_[0-9a-f]+)$")


def sweep(home: Home, st: Store) -> list[str]:
    """Clear what a job that died left, before the next one starts; call it holding the home's sleep lock
    (no other job is writing then). Runs left `running` become `failed` (the same command resumes them);
    `.tmp` files and folders go, and run or adapter folders the store does not know (a crash between
    writing one and registering it). Nothing the store knows is touched. Returns what it cleared."""
    gone = [f"run {i} (marked failed)" for i in st.fail_abandoned_runs()]
    adapters = {a.id for a in st.adapters()}
    runs = {r.id for r in st.runs()}
    debris: list[Path] = []
    for p in _children(home.adapters_dir):
        m = _ADAPTER_DIR.match(p.name)
        if p.name.startswith(".tmp-") or (m and m.group(1) not in adapters):
            debris.append(p)
    for p in _children(home.runs_dir):
        if _RUN_DIR.match(p.name) and p.name not in runs:
            debris.append(p)
        elif p.is_dir():
            debris += [*p.glob("*.tmp"), *(p / "checkpoints").glob(".tmp-*")]
    debris += home.datasets_dir.glob("*.tmp") if home.datasets_dir.is_dir() else []
    for p in debris:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        gone.append(str(p.relative_to(home.root)))
    return gone


def _children(d: Path) -> list[Path]:
    return sorted(d.iterdir()) if d.is_dir() else []
