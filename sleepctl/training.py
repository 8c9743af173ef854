"""Pieces every training loop shares: the new LoRA, the optimiser and schedule, batches, memory figures."""

from __future__ import annotations

import math
import resource
from collections.abc import Callable
from contextlib import contextmanager

import torch

from .recipe import Lora, Optim


def add_lora(model, cfg: Lora, stack: list | None = None, fused: bool = True):
    """A fresh trainable adapter ("default") on the frozen base; earlier adapters, if any, as one frozen "stack".

    The base weights are never changed, so `disable_adapter()` is always the plain base (the anchor's
    reference and eval's base row), and what trains is exactly what vLLM serves (stack + new as one LoRA).
    """
    from peft import LoraConfig, get_peft_model

    from .adapters import NEW, STACK, attach_stack

    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    targets = [t for t in cfg.target_modules if t in names]
    if not targets:
        from .errors import RecipeError

        raise RecipeError(f"lora.target_modules: none of {cfg.target_modules} exist in this model")
    lcfg = LoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets, task_type="CAUSAL_LM"
    )
    if stack:
        pm = attach_stack(model, stack)
        pm.add_adapter(NEW, lcfg)
        pm.base_model.set_adapter([STACK, NEW])
        for n, p in pm.named_parameters():
            p.requires_grad_(f".{NEW}." in n)
    else:
        pm = get_peft_model(model, lcfg, adapter_name=NEW)
    if fused:
        fuse_lora(pm)
    return pm


def fuse_lora(model) -> int:
    """Give every PEFT LoRA Linear the fused forward below; returns how many were changed."""
    from peft.tuners.lora.layer import Linear

    cls = _fused_linear_class()
    n = 0
    for mod in model.modules():
        if type(mod) is Linear:
            mod.__class__ = cls
            n += 1
    return n


_FUSED = None


def _fused_linear_class():
    """PEFT's LoRA Linear computes base(x) + B(A(dropout(x))) * s as three kernels over the full output (a
    product, a scale and an add, each reading and writing [tokens x out_features]); on an H100 seed step
    that elementwise traffic was about half the step. `addmm` adds s * (A x) B^T into the base output in
    the GEMM's epilogue. Used under autocast (bf16 compute, fp32 master weights); any other case (adapters
    disabled or merged, dropout, a LoRA variant, mixed-adapter batches) takes PEFT's own forward.
    """
    global _FUSED
    if _FUSED is not None:
        return _FUSED
    from peft.tuners.lora.layer import Linear

    class FusedLoraLinear(Linear):
        def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            names = [a for a in self.active_adapters if a in self.lora_A]
            if (
                args
                or kwargs
                or self.disable_adapters
                or self.merged
                or not torch.is_autocast_enabled(x.device.type)
                or any(a in self.lora_variant or not isinstance(self.lora_dropout[a], torch.nn.Identity) for a in names)
            ):
                return super().forward(x, *args, **kwargs)
            result = self.base_layer(x)
            shape = result.shape
            out = result.reshape(-1, shape[-1])
            x2 = x.reshape(-1, x.shape[-1])
            for a in names:
                h = x2 @ self.lora_A[a].weight.t()
                out = torch.addmm(out, h, self.lora_B[a].weight.t(), alpha=self.scaling[a])
            return out.view(shape)

    _FUSED = FusedLoraLinear
    return _FUSED


def decoder_layers(model) -> list[torch.nn.Module]:
    """The transformer blocks (the longest `layers` ModuleList), through PEFT and DDP wrappers alike."""
    found = [m for n, m in model.named_modules() if n.endswith("layers") and isinstance(m, torch.nn.ModuleList)]
    return list(max(found, key=len)) if found else []


def compile_layers(model, backend: str | Callable = "inductor") -> int:
    """Compile each decoder block in place (regional compilation, dynamic shapes); returns how many.

    A seed step of the 1.5B student is many small kernels: per block, norms, rotary, SiLU-gating and LoRA's
    elementwise work beside a few GEMMs. Inductor fuses them; the blocks share one code object, so one graph
    serves all of them in a mode, compiled at the mode's first forward (training; no-grad; adapters off;
    the first block, whose input needs no gradient; eval). Those modes can pass dynamo's default of 8
    graphs per function, after which it runs the rest eager without a word: the limit is raised. Forwards
    here run without a KV cache (its per-layer state would compile a graph per block), and generation runs
    eager (`eager`): its cache changes shape every token.
    """
    import torch._dynamo

    cfg = torch._dynamo.config  # the limit's name before torch 2.7: cache_size_limit
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    setattr(cfg, name, max(getattr(cfg, name), 64))
    layers = decoder_layers(model)
    if not layers:
        from .errors import RecipeError

        raise RecipeError("training.compile: no decoder blocks (a `layers` list) found in this model")
    for layer in layers:
        layer.compile(dynamic=True, backend=backend)
    return len(layers)


@contextmanager
def eager(model):
    """Run compiled decoder blocks uncompiled inside this block (sampling with a KV cache)."""
    held = [(m, m._compiled_call_impl) for m in decoder_layers(model) if m._compiled_call_impl is not None]
    for m, _ in held:
        m._compiled_call_impl = None
    try:
        yield
    finally:
        for m, fn in held:
            m._compiled_call_impl = fn


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
    inner = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    with bf16_compute(inner, mixed_precision):
        # no KV cache: nothing generates here, and a cache's per-layer state would recompile compiled blocks
        logits = model(
            input_ids=ids, attention_mask=attn, position_ids=pos, logits_to_keep=T + 1, use_cache=False
        ).logits[:, :T]
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
