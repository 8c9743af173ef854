"""Pieces every training loop shares: the new LoRA, the optimiser and schedule, batches, memory figures."""

from __future__ import annotations

import math
import resource
from contextlib import contextmanager

import torch

from .recipe import Lora, Optim


def add_lora(model, cfg: Lora, name: str = "default"):
    """A fresh trainable adapter on a frozen model; earlier adapters are already merged into its weights."""
    from peft import LoraConfig, get_peft_model

    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    targets = [t for t in cfg.target_modules if t in names]
    if not targets:
        from .errors import RecipeError

        raise RecipeError(f"lora.target_modules: none of {cfg.target_modules} exist in this model")
    lcfg = LoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets, task_type="CAUSAL_LM"
    )
    return get_peft_model(model, lcfg, adapter_name=name)


@contextmanager
def bf16_compute(model, enabled: bool = True):
    """On CUDA, run LoRA's matmuls in bf16 while its weights (and the optimizer) stay fp32.

    PEFT keeps adapter weights in fp32 and casts every input to fp32 to meet them: on an H100 seed step
    that was about two thirds of the GPU time (fp32 GEMMs without tensor cores, and fp32 copies, multiplies
    and adds of every projection's output). Autocast with PEFT's input cast turned off computes in bf16,
    as the frozen base already does, and keeps fp32 master weights and gradients.
    """
    if not enabled or next(model.parameters()).device.type != "cuda":
        yield
        return
    from peft.helpers import disable_input_dtype_casting

    with torch.autocast("cuda", dtype=torch.bfloat16), disable_input_dtype_casting(model):
        yield


def adapter_state(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def make_optimizer(model, cfg: Optim, max_steps: int):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def lr_lambda(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        progress = (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))  # cosine to 10%

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)


def pad_right(seqs: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def completion_logits(
    model, prompts: list[list[int]], completions: list[list[int]], pad: int, mixed_precision: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at the positions that predict each completion token, aligned as [B, T, V], and their mask.

    Teacher and student call this with different prompts (the teacher's has the memory block) and the
    same completions, so both are scored on exactly the same tokens. Prompts are padded on the left and
    completions on the right, so every completion starts at one column and only the T + 1 positions that
    predict it pass through the LM head: with a 150k vocabulary the head over the prompts (memory block
    included) was most of the logits' memory and a good part of the FLOPs.
    """
    device = next(model.parameters()).device
    P = max(len(p) for p in prompts)
    T = max(len(c) for c in completions)
    ids = torch.full((len(prompts), P + T), pad, dtype=torch.long)
    attn = torch.zeros((len(prompts), P + T), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ids[i, P - len(p) : P + len(c)] = torch.tensor(p + c, dtype=torch.long)
        attn[i, P - len(p) : P + len(c)] = 1
    pos = (attn.cumsum(-1) - 1).clamp(min=0)  # positions as if each row started at column 0
    ids, attn, pos = ids.to(device), attn.to(device), pos.to(device)
    with bf16_compute(model, mixed_precision):
        logits = model(input_ids=ids, attention_mask=attn, position_ids=pos, logits_to_keep=T + 1).logits[:, :T]
    mask = torch.arange(T).unsqueeze(0) < torch.tensor([len(c) for c in completions]).unsqueeze(1)
    return logits, mask.to(device)


def labels_tensor(completions: list[list[int]], device) -> torch.Tensor:
    T = max(len(c) for c in completions)
    lab = torch.full((len(completions), T), -100, dtype=torch.long)
    for i, c in enumerate(completions):
        lab[i, : len(c)] = torch.tensor(c, dtype=torch.long)
    return lab.to(device)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
