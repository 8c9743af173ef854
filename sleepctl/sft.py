"""Naive SFT on the raw traces: the baseline that seeding must beat, at the same budget.

Same LoRA size, optimiser, batch size and number of steps as the seed run; the loss is plain
next-token prediction on every token of each trace (a chat rendered with the template, a note as text).
"""

from __future__ import annotations

import random
import time

import torch

from .recipe import Recipe
from .records import Trace
from .training import add_lora, make_optimizer, pad_right, peak_memory_mb


def trace_ids_for_sft(tok, t: Trace, system_prompt: str, max_len: int = 1024) -> list[int]:
    if t.messages:
        msgs = [{"role": "system", "content": system_prompt}] + [m.model_dump() for m in t.messages]
        ids = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=False)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
    else:
        ids = tok(t.text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return list(ids)[:max_len]


def train_sft(model, tok, traces: list[Trace], recipe: Recipe, seed: int = 0):
    """Returns the PEFT-wrapped model (new adapter trained) and a small metrics dict."""
    t0 = time.time()
    model = add_lora(model, recipe.lora)
    opt, sched = make_optimizer(model, recipe.optim, recipe.training.max_steps)
    data = [trace_ids_for_sft(tok, t, recipe.data.system_prompt) for t in traces]
    device = next(model.parameters()).device
    losses = []
    tokens = 0
    model.train()
    for step in range(recipe.training.max_steps):
        rng = random.Random(seed * 1_000_003 + step)
        batch = [data[rng.randrange(len(data))] for _ in range(recipe.training.batch_size)]
        ids, mask = pad_right(batch, tok.pad_token_id, device)
        labels = ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], recipe.optim.grad_clip)
        opt.step()
        sched.step()
        losses.append(loss.item())
        tokens += int(mask.sum())
    model.eval()
    wall = time.time() - t0
    return model, {
        "steps": recipe.training.max_steps,
        "final_loss": losses[-1] if losses else None,
        "wall_s": wall,
        "tokens_per_second": tokens / wall if wall else 0.0,
        "peak_memory_mb": peak_memory_mb(device),
    }
