"""Naive SFT on the raw traces: the baseline that seeding must beat, at the same budget.

Same LoRA size, optimiser, batch size and number of steps as the seed run, through the same loop; the
loss is plain next-token prediction on every token of each trace (a chat rendered with the template, a
note as text).
"""

from __future__ import annotations

import random
import time

from .loop import train
from .recipe import Recipe
from .records import Trace
from .training import add_lora, bf16_compute, make_optimizer, pad_right, peak_memory_mb


def trace_ids_for_sft(tok, t: Trace, system_prompt: str, max_len: int = 1024) -> list[int]:
    if t.messages:
        msgs = [{"role": "system", "content": system_prompt}] + [m.model_dump() for m in t.messages]
        ids = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=False)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
    else:
        ids = tok(t.text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return list(ids)[:max_len]


def train_sft(
    model, tok, traces: list[Trace], recipe: Recipe, seed: int = 0, stack: list | None = None, steps: int | None = None
):
    """Returns the PEFT-wrapped model (new adapter trained over `stack`) and a small metrics dict.

    `steps`: the seed run's own (its adapter records them); by default what the recipe gives a night of these
    memories, never `training.max_steps` alone, which a night under `steps_per_memory` may not reach."""
    t0 = time.time()
    tr = recipe.training
    steps = steps or recipe.night_steps(len(traces))
    model = add_lora(model, recipe.lora, stack, fused=tr.fused_lora)
    opt, sched = make_optimizer(model, recipe.optim, steps)
    data = [trace_ids_for_sft(tok, t, recipe.data.system_prompt) for t in traces]
    device = next(model.parameters()).device

    def batches(step: int, rng: random.Random) -> list[list[int]]:
        return [data[rng.randrange(len(data))] for _ in range(tr.batch_size)]

    tokens = [0]

    def objective(batch: list[list[int]], step: int, rng: random.Random):
        ids, mask = pad_right(batch, tok.pad_token_id, device)
        with bf16_compute(model):
            loss = model(
                input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100), use_cache=False
            ).loss
        tokens[0] += int(mask.sum())
        return loss, {"train/tokens": int(mask.sum())}

    res = train(model, batches, objective, opt, sched, max_steps=steps, seed=seed, grad_clip=recipe.optim.grad_clip)
    model.eval()
    wall = time.time() - t0
    return model, {
        "steps": steps,
        "final_loss": res.last.get("loss"),
        "wall_s": wall,
        "tokens_per_second": tokens[0] / wall if wall else 0.0,
        "peak_memory_mb": peak_memory_mb(device),
    }
