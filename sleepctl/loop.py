"""The one training loop. Seed, consolidation, dream's ReST-EM and the naive-SFT baseline each give it a
batch source and an objective; everything else about a step is the same for all of them:

    for step in range(start, max_steps):
        rng   = step_rng(seed, step)               # per step: a resumed run draws what a straight one would
        batch = batches(step, rng)                 # what to learn
        loss, metrics = objective(batch, step, rng)
        backward; clip; skip the step if the gradient is not finite (bf16 overflow), as AMP does
        optimizer and schedule step; log a metrics row; checkpoint every `checkpoint_every`

Ctrl-C keeps every finished step (a checkpoint is written) and raises `Interrupted` (exit 130); the same
command resumes. A deadline (dream's time budget) ends the loop cleanly between steps.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .errors import SleepError
from .runs import RunFolder, TrainState, save_checkpoint
from .store import now
from .training import adapter_state

Batches = Callable[[int, random.Random], list]
Objective = Callable[[list, int, random.Random], tuple[torch.Tensor, dict[str, Any]]]

err = Console(stderr=True, soft_wrap=True)


class Interrupted(SleepError):
    exit_code = 130


def step_rng(seed: int, step: int) -> random.Random:
    """The random source of one step; torch's generator is reseeded to match."""
    torch.manual_seed(seed * 1_000_003 + step)
    return random.Random(seed * 1_000_003 + step)


@dataclass
class LoopResult:
    completed: int  # steps done, counting those of earlier (resumed) runs
    last: dict[str, Any] = field(default_factory=dict)
    stopped: str | None = None  # "deadline" when the time budget ended it early
    skipped: int = 0


def train(
    model,
    batches: Batches,
    objective: Objective,
    opt,
    sched,
    *,
    max_steps: int,
    seed: int,
    grad_clip: float,
    start: int = 0,
    rf: RunFolder | None = None,
    checkpoint_every: int | None = None,
    deadline: float | None = None,
    label: str = "train",
    show_progress: bool = False,
) -> LoopResult:
    """Run optimizer steps `start`..`max_steps` - 1 of the trainable parameters of `model`."""
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device
    res = LoopResult(completed=start)
    saved = start

    def checkpoint(step: int) -> None:
        nonlocal saved
        if rf is not None and step > saved:
            save_checkpoint(rf, step, adapter_state(model), opt, sched, TrainState(step=step, seed=seed))
            saved = step

    progress = Progress(
        TextColumn(f"[bold]{label}[/bold]"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        disable=not show_progress,
    )
    try:
        with progress:
            task = progress.add_task(label, total=max_steps, completed=start, info="")
            for step in range(start, max_steps):
                if deadline is not None and time.time() > deadline:
                    res.stopped = "deadline"
                    break
                t0 = time.time()
                rng = step_rng(seed, step)
                batch = batches(step, rng)
                model.train()
                loss, m = objective(batch, step, rng)
                tt0 = time.time()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                gn = torch.nn.utils.clip_grad_norm_(params, grad_clip)
                finite = bool(torch.isfinite(gn))
                if finite:
                    opt.step()
                else:  # a non-finite gradient would poison the adapter: skip the update, keep the schedule
                    opt.zero_grad(set_to_none=True)
                    res.skipped += 1
                sched.step()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                dt = time.time() - t0
                m = {
                    "step": step + 1,
                    **m,
                    "loss": loss.item(),
                    "grad_norm": float(gn) if finite else None,
                    "lr": sched.get_last_lr()[0],
                    "step_s": dt,
                    "backward_s": time.time() - tt0,
                    "tokens_per_second": m.get("train/tokens", 0) / dt if dt else 0.0,
                    "time": now(),
                }
                if not finite:
                    m["skipped"] = 1
                if rf is not None:
                    rf.metrics.log(m)
                res.completed, res.last = step + 1, m
                progress.update(task, completed=step + 1, info=_info(m))
                if checkpoint_every and res.completed % checkpoint_every == 0 and res.completed < max_steps:
                    checkpoint(res.completed)
    except KeyboardInterrupt:
        checkpoint(res.completed)  # the step in flight is dropped; every finished one is kept
        raise Interrupted(
            f"interrupted after step {res.completed}; run the same command again to resume",
            hint=f"run {rf.run.id}" if rf else None,
        ) from None
    return res


def _info(m: dict[str, Any]) -> str:
    out = f"loss {m['loss']:.3f}"
    for key, short in (("train/kd_loss", "kd"), ("train/anchor_kl", "anchor"), ("reward/mean", "r"), ("lmbda", "λ")):
        if key in m:
            out += f" {short} {m[key]:.3f}"
    return out
