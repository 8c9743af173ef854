"""Data parallel seeding over several processes, launched by torchrun:

    torchrun --nproc_per_node 2 -m sleepctl seed --recipe qwen-small-large

Rank 0 owns the home: it takes the lock, writes the teacher data, checkpoints and publishes; the other ranks
wait for its data and read it from the run folder. Every rank trains the same adapter on its share of each
step's batch, and PyTorch's DistributedDataParallel averages the gradients (every forward that carries a
gradient must go through its wrapper: a forward through the bare module trains, but the ranks drift apart).
One process (no torchrun) is the plain path: nothing here does anything.
"""

from __future__ import annotations

import atexit
import hashlib
import os
from dataclasses import dataclass

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
    dist.init_process_group("nccl" if cuda else "gloo")
    atexit.register(close, r)  # the group lives as long as the process: a Python caller may seed again
    return r


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
    got: list = [None] * r.world
    dist.all_gather_object(got, h.hexdigest())
    return len(set(got)) == 1


def close(r: Ranks) -> None:
    if r.active and dist.is_initialized():
        dist.destroy_process_group()
