"""Replay: memories of earlier nights come back into tonight's batches, from their cached teacher data.

Nothing in a new night's objective sees old facts unless they are in its batches: trained on new
memories alone, a second night took back a third of the first night's recall. So a `replay.fraction`
share of every batch is drawn from a pool of earlier memories (at most `replay.max_memories`, chosen at
random, the most recent, or the weakest: highest loss under tonight's starting model). Their prompts and
teacher answers are already in the home (no new generation), and they go on-policy like new ones.
"""

from __future__ import annotations

import random

import torch

from .data import Example, is_restatement
from .prompts import cites_memories, render, restatement, restatement_prompts, uncited
from .recipe import Recipe
from .records import Trace
from .store import Store
from .training import completion_logits, labels_tensor


def cached_examples(st: Store, traces: list[Trace], restatements: int) -> dict[str, list[Example]]:
    """Each memory's newest teacher data; a memory without any (an older home) replays its restatements. Data a
    home stored before answers lost their citations of the memory block (`uncited`) loses them here."""
    rows = st.examples([t.id for t in traces])
    out: dict[str, list[Example]] = {}
    for t in traces:
        got = []
        for p, samples in rows.get(t.id, []):
            kept = [a for a in dict.fromkeys(uncited(a, t.text) for a in samples) if not cites_memories(a, t.text)]
            if kept:
                got.append(Example(t.id, p, kept))
        out[t.id] = got or [
            Example(t.id, p, [restatement(t)]) for p in restatement_prompts(t.text, max(1, restatements))
        ]
    return out


@torch.no_grad()
def memory_losses(model, tok, sysp: str, examples: dict[str, list[Example]], per_memory: int = 3) -> dict[str, float]:
    """Mean NLL per answer token of a few of each memory's examples under `model`: how weakly it holds them."""
    items = [(tid, e) for tid, es in examples.items() for e in es[:per_memory]]
    loss: dict[str, list[float]] = {}
    was_training = model.training
    model.eval()
    for i in range(0, len(items), 16):
        chunk = items[i : i + 16]
        prompts = [tok(render(tok, sysp, e.prompt), add_special_tokens=False)["input_ids"] for _, e in chunk]
        answers = [tok(e.samples[0], add_special_tokens=False)["input_ids"][:64] + [tok.eos_token_id] for _, e in chunk]
        logits, mask = completion_logits(model, prompts, answers, tok.pad_token_id)
        nll = torch.nn.functional.cross_entropy(
            logits.float().transpose(1, 2), labels_tensor(answers, logits.device), ignore_index=-100, reduction="none"
        )
        per = (nll * mask).sum(1) / mask.sum(1).clamp(min=1)
        for (tid, _), v in zip(chunk, per.tolist()):
            loss.setdefault(tid, []).append(v)
    if was_training:
        model.train()
    return {k: sum(v) / len(v) for k, v in loss.items()}


def choose(candidates: list[Trace], cfg: Recipe, seed: int, losses: dict[str, float] | None = None) -> list[Trace]:
    """The replay pool: at most `replay.max_memories` earlier memories, by the recipe's sampling rule."""
    n = cfg.replay.max_memories
    if n <= 0 or cfg.replay.fraction <= 0 or not candidates:
        return []
    if len(candidates) <= n:
        return list(candidates)
    how = cfg.replay.sampling
    if how == "recent":
        return sorted(candidates, key=lambda t: (t.created_at, t.id))[-n:]
    if how == "weakest" and losses:
        return sorted(candidates, key=lambda t: -losses.get(t.id, 0.0))[:n]
    return random.Random(seed).sample(candidates, n)


class NightBatches:
    """A batch source: tonight's examples, with a `fraction` of each batch drawn from the replay pool."""

    def __init__(self, new: list[Example], pool: dict[str, list[Example]], fraction: float, batch_size: int):
        self.new, self.batch_size = new, batch_size
        self.pool = {k: v for k, v in sorted(pool.items()) if v}
        self.ids = list(self.pool)
        self.k = round(fraction * batch_size) if self.ids else 0
        if self.new and self.k >= batch_size:
            self.k = batch_size - 1  # tonight's memories always get a place
        if not self.new:
            self.k = batch_size

    def __call__(self, step: int, rng: random.Random) -> list[Example]:
        batch = [self.new[rng.randrange(len(self.new))] for _ in range(self.batch_size - self.k)]
        for _ in range(self.k):
            batch.append(rng.choice(self.pool[self.ids[rng.randrange(len(self.ids))]]))
        return batch


def without_stale(
    examples: dict[str, list[Example]], traces: dict[str, Trace], touched: set[str]
) -> dict[str, list[Example]]:
    """Drop the restatements of memories a newer memory corrects: their text holds the old value."""
    return {
        tid: [e for e in es if not (tid in touched and is_restatement(e, traces[tid]))] or es
        for tid, es in examples.items()
    }
