"""Data parallel seeding over several processes, launched by torchrun:

    torchrun --nproc_per_node 2 -m sleepctl seed --recipe qwen-small-large

Rank 0 owns the home: it takes the lock, writes the teacher data, checkpoints and publishes; the other ranks
wait for its data and read it from the run folder. Every rank trains the same adapter on its share of each
step's batch, and PyTorch's DistributedDataParallel averages the gradients (every forward that carries a
gradient must go through its wrapper: a forward through the bare module trains, but the ranks drift apart).
One process (no torchrun) is the plain path: nothing here does anything.

With `engine: vllm` every rank starts its own engines on its own GPU (the recipe's `distributed.rollouts:
colocate`): `engine_env` hides the other GPUs and torchrun's variables from the engine process while it starts.
"""

from __future__ import annotations

import atexit
import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import SleepError


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def from_env() -> Ranks:
    """The ranks torchrun gave this process (one process: rank 0 of 1)."""
    try:
        return Ranks(
            int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))
        )
    except ValueError as e:
        raise SleepError(f"RANK, WORLD_SIZE or LOCAL_RANK is not a number: {e}", hint="launch with torchrun") from None


def setup(device: str = "auto") -> Ranks:
    """Join the process group torchrun describes: NCCL on GPUs (one per local rank), gloo on CPUs."""
    r = from_env()
    if not r.active or dist.is_initialized():
        return r
    cuda = device != "cpu" and torch.cuda.is_available()
    if cuda:
        if r.local_rank >= torch.cuda.device_count():
            raise SleepError(
                f"local rank {r.local_rank} has no GPU: this machine has {torch.cuda.device_count()}",
                hint="start at most one process per GPU (torchrun --nproc_per_node)",
            )
        torch.cuda.set_device(r.local_rank)
    # the other ranks wait at a barrier while rank 0 writes the teacher data: minutes for a large night, past
    # NCCL's default ten-minute watchdog
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=WAIT_MINUTES))
    atexit.register(close, r)  # the group lives as long as the process: a Python caller may seed again
    return r


WAIT_MINUTES = 120

# what torchrun sets for its workers: a vLLM engine process that inherits them takes itself for a rank of a
# larger group (vLLM reads LOCAL_RANK, and its external launcher mode is keyed on these)
TORCHRUN_VARS = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_RANK",
    "ROLE_WORLD_SIZE",
    "ROLE_NAME",
    "MASTER_ADDR",
    "MASTER_PORT",
)


@contextmanager
def engine_env() -> Iterator[None]:
    """While an engine process starts under torchrun: it sees only this rank's GPU (as its device 0) and none of
    torchrun's variables, so each rank's vLLM engine lands beside its own trainer. One process: no change."""
    r = from_env()
    if not r.active:
        yield
        return
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = [g.strip() for g in visible.split(",")] if visible else [str(i) for i in range(torch.cuda.device_count())]
    if r.local_rank >= len(gpus):
        raise SleepError(
            f"local rank {r.local_rank} has no GPU of its own for its engine ({len(gpus)} visible)",
            hint="start at most one process per GPU (torchrun --nproc_per_node)",
        )
    hidden = [k for k in os.environ if k in TORCHRUN_VARS or k.startswith("TORCHELASTIC_")]
    changed = ["CUDA_VISIBLE_DEVICES", "VLLM_ENABLE_V1_MULTIPROCESSING", *hidden]
    saved = {k: os.environ.get(k) for k in changed}  # only what this changes goes back
    os.environ["CUDA_VISIBLE_DEVICES"] = gpus[r.local_rank]
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"  # an engine inside this process would keep every GPU
    for k in hidden:
        del os.environ[k]
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def refuse(job: str) -> None:
    """Jobs that run on one process only say so, instead of running N times over the same home."""
    if from_env().active:
        raise SleepError(
            f"`{job}` runs on one process; only `seed` trains across several (torchrun)",
            hint=f"run `sleepctl {job}` without torchrun",
        )


def barrier(r: Ranks) -> None:
    if r.active:
        dist.barrier()


def broadcast(r: Ranks, obj):
    """Rank 0's `obj` on every rank."""
    if not r.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wrap(model, r: Ranks):
    """The model every gradient-carrying forward goes through: DDP over `model` on several ranks."""
    if not r.active:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [r.local_rank] if next(model.parameters()).device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def gather(r: Ranks, obj) -> list:
    """Every rank's `obj`, in rank order (one process: [obj])."""
    if not r.active:
        return [obj]
    got: list = [None] * r.world
    dist.all_gather_object(got, obj)
    return got


def shard(batches, r: Ranks):
    """A batch source that gives each rank its share of every step's batch (rank k: items k, k + N, ...)."""
    if not r.active:
        return batches
    return lambda step, rng: batches(step, rng)[r.rank :: r.world]


def weights_agree(model, r: Ranks) -> bool:
    """Whether every rank ended with the same trainable weights: checked before rank 0 publishes."""
    if not r.active:
        return True
    h = hashlib.sha256()
    for _, p in sorted((n, p) for n, p in model.named_parameters() if p.requires_grad):
        h.update(p.detach().float().cpu().numpy().tobytes())
    return len(set(gather(r, h.hexdigest()))) == 1


def close(r: Ranks) -> None:
    if r.active and dist.is_initialized():
        dist.destroy_process_group()
