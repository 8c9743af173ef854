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
from .training import completion_logits


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

    def rows(self, seqs: list[list[int]]) -> tuple[list[list[int]], list[list[int]]]:
        """The paragraphs as `completion_logits` rows: the first token as the prompt, the rest scored. In this
        form they share one forward with the seed's other student passes (`training.merge_forwards`)."""
        keep = [s for s in seqs if len(s) > 1]
        return [s[:1] for s in keep], [s[1:] for s in keep]

    def base_logits(self, model, prompts: list[list[int]], completions: list[list[int]]) -> torch.Tensor:
        """The target: the same model with every adapter off."""
        with torch.no_grad(), model.disable_adapter():
            return completion_logits(model, prompts, completions, self.tok.pad_token_id)[0]

    @staticmethod
    def kl(student: torch.Tensor, base: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return generalized_jsd_loss(student, base.to(student.dtype), mask, beta=0.0)

    def loss(self, model, seqs: list[list[int]], forward=None) -> tuple[torch.Tensor, int]:
        """KL(base || student) per token over the paragraphs; the base is the same model, adapters off.
        `forward`: what the student's forward goes through (DDP's wrapper on several processes)."""
        prompts, completions = self.rows(seqs)
        base = self.base_logits(model, prompts, completions)
        student, mask = completion_logits(forward or model, prompts, completions, self.tok.pad_token_id)
        return self.kl(student, base, mask), int(mask.sum())


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
