"""The anchor to the base: a KL term on general text, and the KL drift alarm on fixed generic prompts.

The adapter-on student is pulled towards the plain base (adapters off, `disable_adapter()`) with
KL(base || student) per token of general text: the base is the target, so the student may not take mass
away from what the base finds likely, which is what perplexity on general text measures. The text is
disjoint from eval's perplexity paragraphs (general_text.py).
"""

from __future__ import annotations

import random

import torch

from .general_text import anchor_paragraphs, drift_items
from .losses import generalized_jsd_loss
from .prompts import render
from .recipe import Recipe
from .training import bf16_compute, completion_logits, pad_right


class AnchorText:
    """Tokenised general-text paragraphs, drawn per step from the step's random source."""

    def __init__(self, tok, cfg: Recipe):
        self.tok, self.cfg = tok, cfg.anchor
        self.texts = anchor_paragraphs(cfg.eval.ppl_paragraphs)
        self._ids: dict[int, list[int]] = {}

    def ids(self, i: int) -> list[int]:
        if i not in self._ids:
            self._ids[i] = self.tok(self.texts[i], add_special_tokens=True)["input_ids"][: self.cfg.max_tokens]
        return self._ids[i]

    def batch(self, rng: random.Random) -> list[list[int]]:
        return [self.ids(i) for i in rng.sample(range(len(self.texts)), self.cfg.batch_size)]

    def loss(self, model, seqs: list[list[int]], forward=None) -> tuple[torch.Tensor, int]:
        """KL(base || student) per token over the paragraphs; the base is the same model, adapters off.
        `forward`: what the student's forward goes through (DDP's wrapper on several processes)."""
        device = next(model.parameters()).device
        ids, mask = pad_right(seqs, self.tok.pad_token_id, device)
        with torch.no_grad(), model.disable_adapter(), bf16_compute(model):
            base = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        with bf16_compute(model):
            student = (forward or model)(input_ids=ids, attention_mask=mask).logits[:, :-1]
        m = mask[:, 1:].bool()
        return generalized_jsd_loss(student, base.to(student.dtype), m, beta=0.0), int(m.sum())


@torch.no_grad()
def kl_drift(model, tok, cfg: Recipe, max_tokens: int = 96) -> float | None:
    """Mean per-token KL(base || model) on fixed generic prompts answered by general text; None without adapters.

    "Tell me about <title>." with the title's Wikipedia paragraph as the answer, teacher-forced: no sampling,
    so the number is exact, cheap, and comparable night after night.
    """
    n = cfg.anchor.drift_prompts
    if n == 0 or not hasattr(model, "disable_adapter"):
        return None
    items = drift_items(n, cfg.eval.ppl_paragraphs)
    sysp = cfg.data.system_prompt
    prompts = [tok(render(tok, sysp, f"Tell me about {t}."), add_special_tokens=False)["input_ids"] for t, _ in items]
    answers = [tok(text, add_special_tokens=False)["input_ids"][:max_tokens] for _, text in items]
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i in range(0, len(items), 8):
            p, a = prompts[i : i + 8], answers[i : i + 8]
            new, mask = completion_logits(model, p, a, tok.pad_token_id)
            with model.disable_adapter():
                base, _ = completion_logits(model, p, a, tok.pad_token_id)
            k = int(mask.sum())
            total += generalized_jsd_loss(new, base.to(new.dtype), mask, beta=0.0).item() * k
            count += k
    finally:
        if was_training:
            model.train()
    return total / max(count, 1)
