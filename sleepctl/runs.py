"""Run folders, checkpoints and the adapter registry.

A run folder holds the resolved recipe, versions, memory ids, metrics.jsonl, an append-only
checkpoints.jsonl and the checkpoints themselves. Adapters are written under a temporary name and moved
into place before the registry row that makes them current is committed, so a crash never leaves a
broken current adapter.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import random
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import BaseModel

from .errors import SleepError
from .home import Home
from .records import Adapter, Run
from .store import Store, new_id, now


def versions() -> dict[str, str]:
    import peft
    import transformers

    from . import __version__

    return {
        "sleepctl": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "platform": platform.platform(),
    }


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
        for line in self.path.read_text().splitlines():
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
    path.mkdir(parents=True)
    (path / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    (path / "versions.json").write_text(json.dumps(versions(), indent=2))
    (path / "memory_ids.json").write_text(json.dumps(memory_ids))
    key = {"kind": kind, "recipe": config_hash(recipe), "memories": config_hash(memory_ids), **(extra or {})}
    (path / "resume_key.json").write_text(json.dumps(key))
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
    opt = torch.load(path / "optim.pt", weights_only=False)
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    return TrainState.model_validate_json((path / "state.json").read_text())


# adapters ---------------------------------------------------------------------------------------


def lineage(st: Store, adapter_id: str | None) -> list[Adapter]:
    """The adapter and its ancestors, oldest first: the stack to apply on the base model."""
    chain: list[Adapter] = []
    seen = set()
    while adapter_id:
        if adapter_id in seen:
            raise SleepError(f"adapter lineage loops at {adapter_id}")
        seen.add(adapter_id)
        a = st.adapter(adapter_id)
        chain.append(a)
        adapter_id = a.parent_id
    return list(reversed(chain))


def apply_stack(model, stack: list[Adapter]):
    """Merge each frozen adapter into the weights in order; what comes back is a plain model again."""
    from peft import PeftModel

    for a in stack:
        if not Path(a.path).exists():
            raise SleepError(f"adapter v{a.version} is missing its files at {a.path}")
        model = PeftModel.from_pretrained(model, a.path).merge_and_unload()
    return model


def publish_adapter(
    home: Home,
    st: Store,
    peft_model,
    *,
    run_id: str,
    kind: str,
    base_model: str,
    parent_id: str | None,
    trace_ids: list[str],
    metrics: dict,
    make_current: bool = True,
    mark_consolidated: bool = True,
) -> Adapter:
    """Write the adapter under a temporary name, move it into place, then commit the registry row."""
    for stale in home.adapters_dir.glob(".tmp-*"):  # left by a crash mid-write; never registered
        shutil.rmtree(stale, ignore_errors=True)
    version = st.next_adapter_version()
    adapter_id = new_id("a")
    final = home.adapters_dir / f"v{version:03d}-{adapter_id}"
    tmp = home.adapters_dir / f".tmp-{adapter_id}"
    try:
        peft_model.save_pretrained(tmp, safe_serialization=True)
        (tmp / "sleepctl.json").write_text(
            json.dumps(
                {
                    "id": adapter_id,
                    "version": version,
                    "run_id": run_id,
                    "base_model": base_model,
                    "parent_id": parent_id,
                },
                indent=2,
            )
        )
        os.replace(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise SleepError(
            f"could not write the adapter: {e.strerror or e}",
            hint="free disk space in the home; the current adapter is unchanged",
        ) from e
    a = Adapter(
        id=adapter_id,
        version=version,
        run_id=run_id,
        kind=kind,
        base_model=base_model,
        parent_id=parent_id,
        path=str(final),
        trace_ids=trace_ids,
        metrics=metrics,
        created_at=now(),
        current=make_current,
    )
    with st.transaction() as db:
        st.insert_adapter(db, a)
        if make_current:
            st.set_current(db, adapter_id)
        if mark_consolidated:
            st.mark_consolidated(db, trace_ids, adapter_id)
    return a


def rollback(st: Store, ref: str | None = None) -> Adapter | None:
    """Make an earlier adapter current (default: the parent of the current one); None means base only."""
    cur = st.current_adapter_id()
    if ref is None:
        if cur is None:
            raise SleepError("no current adapter to roll back from")
        target = st.adapter(cur).parent_id
    elif ref in ("base", "none"):
        target = None
    else:
        target = st.adapter(ref).id
    stack = lineage(st, target)
    with st.transaction() as db:
        st.set_current(db, target)
        # A memory is consolidated only while its adapter is in the current stack: rolled-back
        # memories become pending again, so the next seed learns them anew.
        keep = {a.id for a in stack}
        for row in db.execute("SELECT DISTINCT adapter_id FROM traces WHERE adapter_id IS NOT NULL").fetchall():
            if row[0] not in keep:
                st.mark_pending(db, row[0])
        for a in stack:
            if a.kind != "dream":  # a dream rehearses memories that a seed adapter holds
                st.mark_consolidated(db, a.trace_ids, a.id)
    return st.adapter(target) if target else None
