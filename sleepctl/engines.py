"""Rollout engines: one small interface, with Hugging Face `generate` and vLLM (`vllm_engine.py`) behind it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from .training import bf16_compute


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
        """Make the trainer's weights of this version the ones that sample."""
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
            with bf16_compute(self.model):
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
    when `lora_rank` is given, and samples from whatever adapter was last `sync`ed."""
    if kind == "hf":
        return HFEngine(model, tokenizer, batch_size)
    if kind == "vllm":
        from .recipe import VLLM
        from .vllm_engine import VLLMEngine

        return VLLMEngine(model_dir, tokenizer, vllm or VLLM(), lora_rank=lora_rank, seed=seed, workdir=workdir)
    raise ValueError(kind)
