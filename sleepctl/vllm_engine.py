"""The vLLM rollout engine: fast sampling from the model under training, kept in sync by its LoRA alone.

vLLM serves the frozen base model. Each new weight version of the trainer's LoRA is written out (the
adapter tensors only, a few MB) and served under a fresh `LoRARequest` id, so no merged weights are ever
pushed and a stale adapter can never answer for a new one. The engine tokenises nothing itself
(`skip_tokenizer_init`): prompts go in as the trainer's own token ids and completions are decoded by the
trainer's tokenizer, so both engines see and return exactly the same tokens.

Public reports show LoRA log-probs can differ between vLLM and PEFT, so `check_logprobs` compares the two
on a few sequences before any training step relies on the rollouts.
"""

from __future__ import annotations

import gc
import importlib.util
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from .distributed import engine_env
from .engines import Rollouts
from .errors import ModelError
from .recipe import VLLM

# ranks vLLM's LoRA kernels are built for; an adapter is served in the smallest slot that holds it
LORA_SLOTS = (8, 16, 32, 64, 128, 256, 320, 512)
START_ATTEMPTS, START_RETRY_S = 2, 10.0  # a vLLM start that fails is tried once more, this many seconds later


def unavailable_reason() -> str | None:
    """Why `engine: vllm` cannot run here, or None when it can."""
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed (pip install 'sleepctl[vllm]')"
    if not torch.cuda.is_available():
        return "vLLM needs a CUDA GPU and none is visible"
    return None


def require_vllm() -> None:
    reason = unavailable_reason()
    if reason:
        raise ModelError(f"engine: vllm: {reason}", hint="use the Hugging Face engine: --set engine=hf")


def lora_slot(r: int) -> int:
    for s in LORA_SLOTS:
        if r <= s:
            return s
    raise ModelError(f"lora.r {r} is larger than vLLM serves ({LORA_SLOTS[-1]})", hint="use engine: hf")


def engine_kwargs(cfg: VLLM, lora_rank: int | None, seed: int) -> dict:
    """Arguments of `vllm.LLM`; kept apart so a CPU test can check what the engine would be asked for."""
    if not cfg.cuda_graphs:
        compilation = {"mode": 0}
    elif cfg.compile:
        compilation = {"mode": 3}  # vLLM's default: compiled model, piecewise + full CUDA graphs
    else:  # no torch.compile (start in seconds), decode still captured as full CUDA graphs
        compilation = {"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY"}
    kw = dict(
        skip_tokenizer_init=True,
        dtype="bfloat16",
        seed=seed,
        gpu_memory_utilization=cfg.gpu_memory_utilization,
        max_model_len=cfg.max_model_len,
        max_num_seqs=cfg.max_num_seqs,
        enable_sleep_mode=cfg.sleep,
        enforce_eager=not cfg.cuda_graphs,
        compilation_config=compilation,
        enable_prefix_caching=True,
    )
    if lora_rank is not None:
        kw.update(enable_lora=True, max_lora_rank=lora_slot(lora_rank), max_loras=1, max_cpu_loras=2)
    return kw


def live_lora(peft_model):
    """The trainable adapter's tensors and config, as the trainer holds them now."""
    from peft import get_peft_model_state_dict

    from .adapters import NEW

    cfg = peft_model.peft_config[NEW]
    state = get_peft_model_state_dict(peft_model, adapter_name=NEW)
    targets = sorted(cfg.target_modules) if not isinstance(cfg.target_modules, str) else [cfg.target_modules]
    return {k: v.detach() for k, v in state.items()}, {
        "r": cfg.r,
        "lora_alpha": cfg.lora_alpha,
        "use_rslora": cfg.use_rslora,
        "target_modules": targets,
    }


def sync_dir(workdir: str | Path | None) -> Path:
    """Where adapters are written for vLLM to read: tmpfs (/dev/shm) when there is one, so a sync never
    touches a disk; else the home's tmp folder."""
    shm = Path("/dev/shm")
    base = shm if workdir is None and shm.is_dir() and os.access(shm, os.W_OK) else workdir
    if base is not None:
        Path(base).mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="sleepctl-vllm-", dir=base))


class VLLMEngine:
    """`RolloutEngine` on vLLM. `sync` before sampling, `sleep` while the trainer steps, `close` at the end."""

    def __init__(
        self,
        model_dir: str | Path,
        tokenizer,
        cfg: VLLM,
        *,
        lora_rank: int | None = None,
        seed: int = 0,
        workdir: str | Path | None = None,
    ):
        require_vllm()
        from vllm import LLM

        self.tok, self.cfg = tokenizer, cfg
        self.lora_enabled = lora_rank is not None
        self.lora_rank = lora_slot(lora_rank) if lora_rank else None
        self.workdir = sync_dir(workdir)
        self.lora = None  # the LoRARequest that answers now
        self.frozen = None  # the stack under the trainer's adapter (adapters.LoraState), served with it
        self.version: int | None = None  # trainer weight version the served adapter holds
        self.served: str | None = None  # key of the inference adapter served by `serve`
        self._next_id = 1
        self.asleep = False
        self.timings: dict[str, float] = {"sleep_s": 0.0, "wake_s": 0.0, "sync_s": 0.0, "syncs": 0}
        t0 = time.time()
        for attempt in range(START_ATTEMPTS):
            # blocks the trainer's caching allocator holds but no longer uses look taken to vLLM's memory check
            gc.collect()
            torch.cuda.empty_cache()
            try:
                with engine_env():  # under torchrun: this rank's GPU, not every rank's first one
                    self.llm = LLM(model=str(model_dir), **engine_kwargs(cfg, lora_rank, seed))
                break
            except Exception as e:  # noqa: BLE001 - vLLM fails in many ways; one message names the model
                if attempt + 1 < START_ATTEMPTS:
                    # vLLM's memory profile fails when another process on the GPU frees memory meanwhile
                    # (a second job's engine closing); the same start a few seconds later succeeds
                    print(f"vLLM did not start ({str(e)[:120]}); trying once more", file=sys.stderr)
                    time.sleep(START_RETRY_S)
                    continue
                shutil.rmtree(self.workdir, ignore_errors=True)
                raise ModelError(
                    f"vLLM could not start on {model_dir} ({START_ATTEMPTS} tries): {e}",
                    hint="use the Hugging Face engine: --set engine=hf",
                ) from e
        self.start_s = time.time() - t0

    # --- weights -------------------------------------------------------------------------------------

    def sync(self, model, version: int) -> None:
        """Serve the trainer's current adapter (over the frozen stack): a new id per weight version."""
        if not self.lora_enabled or (version == self.version and self.served is None):
            return
        from .adapters import concat_loras

        t0 = time.time()
        self._load(concat_loras([p for p in (self.frozen, live_lora(model)) if p is not None]))
        self.version, self.served = version, None
        self.timings["sync_s"] += time.time() - t0
        self.timings["syncs"] += 1

    def serve(self, lora, key: str | None = None) -> None:
        """Sample from this adapter (None: the plain base) until the next `serve` or `sync`."""
        key = key or ("base" if lora is None else None)
        if key is not None and key == self.served:
            return
        if lora is None:
            self._drop()
        else:
            self._load(lora)
        self.version, self.served = None, key or f"lora:{self._next_id - 1}"

    def _load(self, lora) -> None:
        from vllm.lora.request import LoRARequest

        from .adapters import write_lora

        self.wake()
        lid = self._next_id
        self._next_id += 1
        path = self.workdir / f"lora-{lid}"
        write_lora(lora, path)
        old = self.lora
        # a new name per weight version: vLLM's prefix cache is keyed by the LoRA's name
        self.lora = LoRARequest(f"sleepctl-{lid}", lid, str(path))
        self.llm.llm_engine.add_lora(self.lora)
        if old is not None:
            self.llm.llm_engine.remove_lora(old.lora_int_id)
            shutil.rmtree(old.lora_path, ignore_errors=True)

    def _drop(self) -> None:
        if self.lora is not None:
            self.llm.llm_engine.remove_lora(self.lora.lora_int_id)
            shutil.rmtree(self.lora.lora_path, ignore_errors=True)
            self.lora = None

    def sleep(self) -> None:
        """Give the GPU back to the trainer (weights to host memory, KV cache dropped), if the recipe asks."""
        if self.cfg.sleep and not self.asleep:
            t0 = time.time()
            self.llm.sleep(level=1)
            self.asleep = True
            self.timings["sleep_s"] += time.time() - t0

    def wake(self) -> None:
        if self.asleep:
            t0 = time.time()
            self.llm.wake_up()
            self.asleep = False
            self.timings["wake_s"] += time.time() - t0

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception:  # noqa: BLE001 - shutting down a half-started engine must not mask the real error
                pass
            del self.llm
        gc.collect()
        torch.cuda.empty_cache()
        shutil.rmtree(self.workdir, ignore_errors=True)

    # --- sampling ------------------------------------------------------------------------------------

    def generate(
        self, prompts: list[str], *, max_new_tokens: int, temperature: float, num_samples: int = 1, seed: int = 0
    ) -> Rollouts:
        ids = [self.tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        return self.generate_ids(
            ids, max_new_tokens=max_new_tokens, temperature=temperature, num_samples=num_samples, seed=seed
        )

    def generate_ids(
        self,
        prompt_ids: list[list[int]],
        *,
        max_new_tokens: int,
        temperature: float,
        num_samples: int = 1,
        seed: int = 0,
    ) -> Rollouts:
        from vllm import SamplingParams

        self.wake()
        eos = self.tok.eos_token_id
        params = [
            SamplingParams(
                n=num_samples,
                max_tokens=max_new_tokens,
                temperature=temperature,
                top_p=1.0,
                top_k=0,
                repetition_penalty=1.0,
                seed=seed + i,  # per prompt: reproducible, and prompts do not share random draws
                stop_token_ids=[eos],
                detokenize=False,
            )
            for i in range(len(prompt_ids))
        ]
        outs = self.llm.generate(
            [{"prompt_token_ids": p} for p in prompt_ids], params, use_tqdm=False, lora_request=self.lora
        )
        ro = Rollouts([], [], [])
        for p, out in zip(prompt_ids, outs):
            for o in out.outputs:
                row = list(o.token_ids)
                ro.prompt_ids.append(list(p))
                ro.completion_ids.append(row)
                ro.texts.append(self.tok.decode(row, skip_special_tokens=True).strip())
        return ro

    def prompt_logprobs(self, seqs: list[list[int]]) -> list[list[float]]:
        """log p(token | prefix) of every token after the first, under the served adapter."""
        from vllm import SamplingParams

        self.wake()
        sp = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        outs = self.llm.generate([{"prompt_token_ids": s} for s in seqs], sp, use_tqdm=False, lora_request=self.lora)
        return [[lp[t].logprob for t, lp in zip(s[1:], out.prompt_logprobs[1:])] for s, out in zip(seqs, outs)]


@torch.no_grad()
def trainer_logprobs(model, seqs: list[list[int]], pad: int) -> list[list[float]]:
    """log p(token | prefix) of every token after the first, scored the way a training step scores them."""
    from .losses import sequence_logps
    from .training import completion_logits, labels_tensor

    comps = [s[1:] for s in seqs]
    logits, _ = completion_logits(model, [s[:1] for s in seqs], comps, pad)
    got = sequence_logps(logits, labels_tensor(comps, logits.device))
    return [got[i, : len(c)].tolist() for i, c in enumerate(comps)]


def check_logprobs(
    engine: VLLMEngine,
    model,
    seqs: list[list[int]],
    pad: int,
    tolerance: float,
    seed: int = 0,
    rel_tolerance: float = 0.0,
) -> dict:
    """vLLM's log-probs under the served adapter must match the trainer's; else rollouts are off-policy.

    A fresh adapter is all zeros (B = 0) and would test nothing of the LoRA path, so the check then runs on
    a seeded random B, restored afterwards; `lora_effect` shows how far that adapter moves the log-probs,
    so a reader can see the check was not vacuous. The allowance is `tolerance + rel_tolerance * lora_effect`:
    bf16 rounding in the LoRA path grows with the delta it adds (on the GPU: mean 0.01-0.02 under an effect of
    0.2-0.6, 0.035-0.055 under a deep stack's 2-2.8), while a real fault (an adapter not applied, a wrong
    scale, a missing module) is off by a large share of the effect itself.
    """
    lora_b = [p for n, p in model.named_parameters() if p.requires_grad and "lora_B" in n]
    fresh = all(float(p.detach().abs().max()) == 0.0 for p in lora_b)
    saved = [p.detach().clone() for p in lora_b]
    g = torch.Generator().manual_seed(seed)
    if fresh:
        with torch.no_grad():
            for p in lora_b:
                p.copy_(torch.randn(p.shape, generator=g).to(p) * 0.02)
    was_training = model.training
    model.eval()
    try:
        engine.sync(model, version=-1)  # its own id: the probe adapter never answers a rollout
        ours = trainer_logprobs(model, seqs, pad)
        theirs = engine.prompt_logprobs(seqs)
        with model.disable_adapter():
            base = trainer_logprobs(model, seqs, pad)
    finally:
        with torch.no_grad():
            for p, s in zip(lora_b, saved):
                p.copy_(s)
        engine.version = None  # whatever is served now is not the trainer's weights
        if was_training:
            model.train()
    diffs = [abs(a - b) for x, y in zip(ours, theirs) for a, b in zip(x, y)]
    effect = [abs(a - b) for x, y in zip(ours, base) for a, b in zip(x, y)]
    report = {
        "tokens": len(diffs),
        "mean_abs_diff": sum(diffs) / len(diffs),
        "max_abs_diff": max(diffs),
        "lora_effect": sum(effect) / len(effect),
        "probe_adapter": fresh,
        "tolerance": tolerance,
        "rel_tolerance": rel_tolerance,
    }
    report["allowed"] = tolerance + rel_tolerance * report["lora_effect"]
    if report["mean_abs_diff"] > report["allowed"]:
        raise ModelError(
            f"vLLM's log-probs under the adapter differ from the trainer's by {report['mean_abs_diff']:.3f} nats/token "
            f"on average (max {report['max_abs_diff']:.3f}; allowed {report['allowed']:.3f} = {tolerance} + "
            f"{rel_tolerance} x the adapter's effect {report['lora_effect']:.3f}); its rollouts would not be on-policy",
            hint="use the Hugging Face engine (--set engine=hf), or raise vllm.logprob_tolerance knowingly",
        )
    return report
