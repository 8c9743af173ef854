"""Rollout engines: one small interface, with Hugging Face `generate` and vLLM (`vllm_engine.py`) behind it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from .training import bf16_compute, eager


@dataclass
class Rollouts:
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]  # up to and including EOS when the model stopped
    texts: list[str]

    @property
    def num_tokens(self) -> int:
        return sum(len(c) for c in self.completion_ids)


class RolloutEngine(Protocol):
    def generate(
        self, prompts: list[str], *, max_new_tokens: int, temperature: float, num_samples: int = 1, seed: int = 0
    ) -> Rollouts:
        """Completions for each prompt, `num_samples` consecutive entries per prompt; temperature 0 is greedy."""
        ...

    def sync(self, model, version: int) -> None:
        """Make the trainer's weights of this version (with the frozen stack under them) the ones that sample."""
        ...

    def serve(self, lora, key: str | None = None) -> None:
        """Sample from a given adapter (a `LoraState`), or from the plain base when None (inference jobs)."""
        ...

    def sleep(self) -> None:
        """The trainer steps now: give back what memory the engine can."""
        ...

    def wake(self) -> None: ...

    def close(self) -> None: ...


class HFEngine:
    """Batched `model.generate` with left padding. Works for PEFT-wrapped models: the active adapter samples."""

    def __init__(self, model, tokenizer, batch_size: int = 16):
        self.model, self.tok, self.batch_size = model, tokenizer, batch_size

    @torch.no_grad()
    def generate(
        self, prompts: list[str], *, max_new_tokens: int, temperature: float, num_samples: int = 1, seed: int = 0
    ) -> Rollouts:
        expanded = [p for p in prompts for _ in range(num_samples)]
        out = Rollouts([], [], [])
        was_training = self.model.training
        self.model.eval()
        torch.manual_seed(seed)
        device = next(self.model.parameters()).device
        eos = self.tok.eos_token_id
        for i in range(0, len(expanded), self.batch_size):
            chunk = expanded[i : i + self.batch_size]
            self.tok.padding_side = "left"
            enc = self.tok(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            # explicit: a model's generation_config (Qwen: top_k 20, repetition penalty) must not change the policy
            kwargs = dict(
                max_new_tokens=max_new_tokens,
                pad_token_id=self.tok.pad_token_id,
                eos_token_id=eos,
                repetition_penalty=1.0,
            )
            if temperature > 0:
                kwargs.update(do_sample=True, temperature=temperature, top_p=1.0, top_k=0)
            else:
                kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            with bf16_compute(self.model), eager(self.model):
                gen = self.model.generate(**enc, **kwargs)
            new = gen[:, enc["input_ids"].shape[1] :].tolist()
            for row, ids, mask in zip(new, enc["input_ids"].tolist(), enc["attention_mask"].tolist()):
                if eos in row:
                    row = row[: row.index(eos) + 1]
                out.prompt_ids.append([t for t, m in zip(ids, mask) if m])
                out.completion_ids.append(row)
                out.texts.append(self.tok.decode(row, skip_special_tokens=True).strip())
        if was_training:
            self.model.train()
        return out

    # it samples from the live model: nothing to sync, nothing held apart from the trainer
    def sync(self, model, version: int) -> None:
        pass

    def serve(self, lora, key: str | None = None) -> None:
        pass  # the caller picks the adapters of the live model (disable_adapter, adapters.active)

    def sleep(self) -> None:
        pass

    def wake(self) -> None:
        pass

    def close(self) -> None:
        pass


def make_engine(
    kind: str,
    model,
    tokenizer,
    batch_size: int = 16,
    *,
    model_dir=None,
    vllm=None,
    lora_rank: int | None = None,
    seed: int = 0,
    workdir=None,
) -> RolloutEngine:
    """`hf` samples from `model` itself; `vllm` serves `model_dir` (the same weights, frozen) plus a LoRA slot
    when `lora_rank` is given, and samples from whatever adapter was last `sync`ed or `serve`d."""
    if kind == "hf":
        return HFEngine(model, tokenizer, batch_size)
    if kind == "vllm":
        from .recipe import VLLM
        from .vllm_engine import VLLMEngine

        return VLLMEngine(model_dir, tokenizer, vllm or VLLM(), lora_rank=lora_rank, seed=seed, workdir=workdir)
    raise ValueError(kind)


# --- engines that live for the whole process ----------------------------------------------------------------
#
# A vLLM engine takes 30-40 s to start. Seed, dream, eval and consolidation of one night (or of five, in
# bench_nights.py) reuse one engine per served model: the student's serves the plain base and every
# adapter stack as a LoRARequest; the teacher's serves the teacher. `release_engines()` shuts them down.

_SHARED: dict[str, object] = {}


def lora_capacity(cfg, frozen: int) -> int:
    """The LoRA rank an engine should be able to serve: `frozen` stacked adapters plus one more (the one
    training, or the newest of a stack served whole), and room for a few nights' growth and one refused
    consolidation (the stack then passes `max_adapters` by one), so the engine is not restarted as the
    stack deepens: on the H100 such a restart cost a night about 50 s."""
    consolidated = max(0, (cfg.consolidate.rank or cfg.lora.r) - cfg.lora.r)  # a wider adapter at the stack's root
    return cfg.lora.r * (max(frozen, min(cfg.consolidate.max_adapters, 3) + 1) + 1) + consolidated


def rollout_engine(cfg, model, tok, model_dir, lora_rank: int | None, home=None, teacher: bool = False):
    """The engine of the recipe for this model: a new HF engine, or the process's vLLM engine for `model_dir`."""
    if cfg.engine == "hf":
        return HFEngine(model, tok, cfg.eval.batch_size)
    from .vllm_engine import VLLMEngine, lora_slot

    key = str(model_dir)
    eng = _SHARED.get(key)
    want = lora_slot(lora_rank) if lora_rank else None
    if eng is not None and want and (eng.lora_rank is None or eng.lora_rank < want):
        eng.close()  # started for a shallower stack (or without LoRA): restart with a larger slot
        eng = None
    if eng is None:
        vcfg = cfg.vllm
        if teacher:
            vcfg = vcfg.model_copy(update={"gpu_memory_utilization": vcfg.teacher_gpu_memory_utilization})
        eng = VLLMEngine(model_dir, tok, vcfg, lora_rank=lora_rank, seed=cfg.training.seed)
        _SHARED[key] = eng
    eng.wake()
    return eng


def release_engines() -> None:
    """Shut down every engine this process started (the GPU memory goes back)."""
    while _SHARED:
        _, eng = _SHARED.popitem()
        eng.close()
