"""GPU benchmark of the sleep cycle's moving parts, on random weights of real shapes (no downloads).

    python scripts/gpu_bench.py                      # everything; vLLM parts where vLLM is installed, the full
                                                     # night where the real pair is too
    python scripts/gpu_bench.py --memories 100 --out .bench/gpu

Measures, for a Qwen2.5-0.5B-shaped teacher and a Qwen2.5-1.5B-shaped student in bf16:
  rollout tokens/s     HF `generate` (plain, and through the PEFT LoRA the tool samples from) and vLLM
                       with a LoRARequest, batch 64 and 256, 128 new tokens
  teacher scoring      tokens/s of the teacher's no-grad forward over prompt + memory + completion
  training step        tokens/s and model FLOPs utilisation of a seed step (teacher forward, student
                       forward and backward through LoRA, optimizer), with the LM head over completion
                       positions only (now) and over every position (before), batch 16 and 64
  vLLM extras          engine start, sleep / wake time and memory freed, LoRA sync time, log-prob check
  full seed            wall time of `sleepctl.seed` on N generated memories with the recipe
                       qwen-small-large (its steps and batch), engine start included

Random weights make the speed figures honest and the quality meaningless: a random model rarely stops,
so every rollout runs to its token budget (the slowest case). The tokenizer is a byte-level BPE trained
here on the generated memories; the models keep Qwen2.5's 151,936-row vocabulary, so the LM head costs
what it costs on the real models.

MFU counts matmul FLOPs: 2 per parameter per token for a forward pass (LM head only at the positions
kept), the same again for the backward pass through frozen weights (input gradients only; LoRA's own
weight gradients are counted too), plus causal attention; divided by the GPU's dense bf16 peak.
A benchmark, not a test: it measures and prints; nothing fails on a number.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHAPES = {  # Qwen2.5 configurations (config.json of the released models)
    "0.5b": dict(
        hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2
    ),
    "1.5b": dict(
        hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2
    ),
    # --student 7b: the shape agents are built on; its vocabulary is kept at the small models' 151,936 rows
    # (the released 7B pads to 152,064) so one tokenizer serves the pair, and its embeddings are untied as there
    "7b": dict(
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4
    ),
}
TINY = {  # --tiny: the same code path at toy size, so a CPU test keeps this script working
    "0.5b": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    ),
    "1.5b": dict(
        hidden_size=96, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    ),
    "7b": dict(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    ),
}
PAIR = ("0.5b", "1.5b")  # the teacher and student shapes of the step, rollout and vLLM parts
VOCAB = 151936
DEVICE = "cuda"
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "H800": 989.4, "A100": 312.0, "L40S": 362.1, "L4": 121.0}

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

PEOPLE = [
    "Orla Brennick",
    "Tomas Ilves",
    "Mira Castell",
    "Jun Okafor",
    "Priya Raman",
    "Lev Sandoval",
    "Ana Kovac",
    "Ben Ashworth",
]
THINGS = [
    "build server",
    "billing service",
    "search index",
    "release train",
    "staging cluster",
    "design review",
    "data export",
    "on-call rota",
]
PROJECTS = ["Kestrel", "Marrow", "Quill", "Harbor", "Lumen", "Tansy", "Cobalt", "Wren", "Basalt", "Juniper"]
PLACES = ["Tallinn", "Porto", "Lagos", "Osaka", "Quito", "Oslo", "Perth", "Tunis", "Leeds", "Cusco"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October"]


def memories(n: int, seed: int = 0) -> list[str]:
    """N distinct fictional memories of the kind an agent records; generated so N can be anything."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        who, what, proj, where = rng.choice(PEOPLE), rng.choice(THINGS), PROJECTS[i % 10] + f"-{i}", rng.choice(PLACES)
        day, month, num = rng.randint(1, 28), rng.choice(MONTHS), rng.randint(2, 90)
        out.append(
            f"{who} moved the {proj} {what} to {where} on {month} {day}. It now needs {num} minutes for a full run, "
            f"and questions about it go to {rng.choice(PEOPLE)} instead of the old channel."
        )
    return out


def build_tokenizer(texts: list[str], path: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=4096, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    from sleepctl.prompts import question_request

    t.train_from_iterator(texts + [question_request(x, 8) for x in texts[:50]], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = CHATML
    tok.save_pretrained(path)
    return tok


def build_model(shape: str, tok, path: Path, seed: int, tiny: bool = False):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=4096 if tiny else VOCAB,  # the BPE above has at most 4096 entries
        max_position_embeddings=32768,
        tie_word_embeddings=shape != "7b",
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
        rope_theta=1e6,
        **(TINY if tiny else SHAPES)[shape],
    )
    with torch.device(DEVICE):
        model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    model.eval().requires_grad_(False)
    return model


def params(model) -> dict:
    cfg = model.config
    body = sum(
        p.numel()
        for n, p in model.named_parameters()
        if "embed_tokens" not in n and "lm_head" not in n and "lora_" not in n
    )
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    return {
        "body": body,
        "head": cfg.hidden_size * cfg.vocab_size,
        "lora": lora,
        "layers": cfg.num_hidden_layers,
        "hidden": cfg.hidden_size,
    }


def forward_flops(p: dict, lengths: list[int], kept: int) -> float:
    """Matmul FLOPs of one forward pass over sequences of these lengths, LM head at `kept` positions."""
    tokens = sum(lengths)
    attn = sum(2 * 2 * p["layers"] * p["hidden"] * L * L / 2 for L in lengths)  # QK^T and AV, causal half
    return 2 * (p["body"] + p["lora"]) * tokens + 2 * p["head"] * kept + attn


def peak_tflops() -> float | None:
    name = torch.cuda.get_device_name(0)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def timed(fn, repeat: int = 1) -> float:
    sync()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync()
    return (time.perf_counter() - t0) / repeat


def hf_rollouts(model, batch: int, new: int, prompt_len: int = 64) -> float:
    ids = torch.randint(100, 4000, (batch, prompt_len), device=DEVICE)
    kw = dict(
        do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new, min_new_tokens=new, pad_token_id=0
    )
    model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), **{**kw, "max_new_tokens": 4, "min_new_tokens": 4}
    )
    dt = timed(lambda: model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw))
    return batch * new / dt


def batch_shapes(rng: random.Random, batch: int) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
    """Student prompts (~90 tokens), teacher prompts (the same plus a ~150-token memory block), completions (<= 64)."""
    s_prompts = [[rng.randrange(100, 4000) for _ in range(rng.randint(70, 110))] for _ in range(batch)]
    t_prompts = [[rng.randrange(100, 4000) for _ in range(rng.randint(120, 180))] + p for p in s_prompts]
    comps = [[rng.randrange(100, 4000) for _ in range(rng.randint(24, 64))] for _ in range(batch)]
    return s_prompts, t_prompts, comps


def legacy_completion_logits(model, prompts, completions, pad):
    """Before: right padding and the LM head over every position, then a gather (kept to measure the change)."""
    from sleepctl.training import pad_right

    device = next(model.parameters()).device
    ids, attn = pad_right([p + c for p, c in zip(prompts, completions)], pad, device)
    logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits
    T = max(len(c) for c in completions)
    index = torch.zeros((len(prompts), T), dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.bool)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        index[i, : len(c)] = torch.arange(len(p) - 1, len(p) - 1 + len(c))
        mask[i, : len(c)] = True
    out = torch.gather(logits, 1, index.to(device).unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
    return out, mask.to(device)


VARIANTS = {  # each change to the seed step, measured against the one before it
    "before": "LM head over every position, LoRA computed in fp32 (PEFT default)",
    "head": "LM head over completion positions only",
    "bf16": "LM head over completions, LoRA matmuls in bf16 (fp32 master weights)",
    "fused": "+ LoRA added into the base output by one addmm (no separate scale and add)",
    "compiled": "+ each decoder block compiled (torch.compile, dynamic shapes; training.compile)",
}


def train_step_bench(
    teacher,
    student_peft,
    batch: int,
    variant: str,
    peak: float | None,
    profile: Path | None = None,
    backend: str = "inductor",
) -> dict:
    from functools import partial

    from sleepctl.losses import divergence
    from sleepctl.recipe import Optim
    from sleepctl.training import _fused_linear_class, compile_layers, completion_logits, fuse_lora, make_optimizer

    legacy = variant == "before"
    score = {  # bf16 on: completion_logits as the seed calls it
        "before": legacy_completion_logits,
        "head": partial(completion_logits, mixed_precision=False),
    }.get(variant, completion_logits)
    from peft.tuners.lora.layer import Linear

    fused, fused_cls = variant in ("fused", "compiled"), _fused_linear_class()  # compiled builds on fused
    for mod in student_peft.modules():  # the variant decides which LoRA forward runs
        if not fused and type(mod) is fused_cls:
            mod.__class__ = Linear
    if fused:
        fuse_lora(student_peft)
    if variant == "compiled":  # in place: the last variant; both models, as a self-teacher's blocks are the student's
        compile_layers(student_peft, backend)
        compile_layers(teacher, backend)
    rng = random.Random(batch)
    s_p, t_p, comps = batch_shapes(rng, batch)
    opt, _ = make_optimizer(student_peft, Optim(lr=1e-5), 100)

    def step():
        with torch.no_grad():
            t_logits, _ = score(teacher, t_p, comps, 0)
        s_logits, mask = score(student_peft, s_p, comps, 0)
        loss = divergence("forward_kl", s_logits, t_logits.to(s_logits.dtype), mask, 0.5)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def teacher_only():
        with torch.no_grad():
            score(teacher, t_p, comps, 0)

    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    first = timed(step)  # a compiled variant's compilation (once per mode and model, not per batch size)
    step()
    dt = timed(step, 5)
    dt_t = timed(teacher_only, 5)
    if profile is not None:  # where a step's GPU time goes, kernel by kernel
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as prof

        with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as pr:
            step()
            sync()
        profile.write_text(pr.key_averages().table(sort_by="self_device_time_total", row_limit=40))
    kept = sum(len(c) for c in comps) if not legacy else None
    sp, tp = params(student_peft), params(teacher)
    s_len = [len(p) + len(c) for p, c in zip(s_p, comps)]
    t_len = [len(p) + len(c) for p, c in zip(t_p, comps)]
    pad_s = len(s_p) * (max(len(p) for p in s_p) + max(len(c) for c in comps))
    kept_s = kept if kept is not None else pad_s
    kept_t = kept if kept is not None else len(t_p) * (max(len(p) for p in t_p) + max(len(c) for c in comps))
    f_student = forward_flops(sp, s_len, kept_s)
    # backward through frozen weights: input gradients (about one forward); LoRA weight gradients on top
    flops = forward_flops(tp, t_len, kept_t) + 2 * f_student + 2 * sp["lora"] * sum(s_len)
    trained = sum(len(c) for c in comps)
    return {
        "batch": batch,
        "variant": variant,
        "change": VARIANTS[variant],
        "step_s": dt,
        "first_step_s": first,
        "trained_tokens_per_s": trained / dt,
        "processed_tokens_per_s": (sum(s_len) + sum(t_len)) / dt,
        "teacher_scoring_tokens_per_s": sum(t_len) / dt_t,
        "tflops": flops / dt / 1e12,
        "mfu": flops / dt / (peak * 1e12) if peak else None,
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else None,
    }


def vllm_bench(model_dir: Path, student_peft, tok, rank: int, batches: list[int], new: int) -> dict:
    from sleepctl.recipe import VLLM
    from sleepctl.vllm_engine import VLLMEngine, check_logprobs

    res: dict = {}
    eng = VLLMEngine(model_dir, tok, VLLM(sleep=True, gpu_memory_utilization=0.35), lora_rank=rank, seed=0)
    try:
        res["start_s"] = eng.start_s
        seqs = [[rng_i % 3000 + 100 for rng_i in range(k * 37, k * 37 + 48)] for k in range(4)]
        res["logprob_check"] = check_logprobs(eng, student_peft, seqs, tok.pad_token_id, tolerance=1.0)
        t0 = time.time()
        eng.sync(student_peft, version=1)
        res["lora_sync_s"] = time.time() - t0
        res["lora_sync_dir"] = str(eng.workdir)
        from sleepctl.vllm_engine import sync_dir

        # the same engine writing its adapters to tmpfs (now) or to a disk folder (before), alternately
        (ROOT / ".bench").mkdir(exist_ok=True)
        dirs = {"tmpfs": eng.workdir, "disk": sync_dir(ROOT / ".bench" / "sync-disk")}
        times: dict[str, list[float]] = {"tmpfs": [], "disk": []}
        for i in range(5):
            for name, d in dirs.items():
                eng.workdir = d
                t0 = time.time()
                eng.sync(student_peft, version=100 + 2 * i + (name == "disk"))
                times[name].append(time.time() - t0)
        eng.workdir = dirs["tmpfs"]
        shutil.rmtree(dirs["disk"], ignore_errors=True)
        res["lora_sync_s_tmpfs"] = sum(times["tmpfs"]) / 5
        res["lora_sync_s_disk"] = sum(times["disk"]) / 5
        prompt = [[random.Random(i).randrange(100, 4000) for _ in range(64)] for i in range(max(batches))]
        eng.generate_ids(prompt[:8], max_new_tokens=8, temperature=1.0)
        for b in batches:
            t0 = time.time()
            ro = eng.generate_ids(prompt[:b], max_new_tokens=new, temperature=1.0, seed=1)
            dt = time.time() - t0
            res[f"rollout_tokens_per_s_batch{b}"] = ro.num_tokens / dt
            res[f"rollout_mean_len_batch{b}"] = ro.num_tokens / b
        free0 = torch.cuda.mem_get_info()[0]
        t0 = time.time()
        eng.sleep()
        res["sleep_s"] = time.time() - t0
        res["freed_by_sleep_gb"] = (torch.cuda.mem_get_info()[0] - free0) / 2**30
        t0 = time.time()
        eng.wake()
        res["wake_s"] = time.time() - t0
        ro = eng.generate_ids(prompt[:8], max_new_tokens=8, temperature=1.0)
        res["generates_after_wake"] = len(ro.completion_ids) == 8
    finally:
        eng.close()
    return res


class GpuMemory:
    """Peak memory.used of every GPU, sampled from nvidia-smi while a job runs: the trainers' and the vLLM
    engine processes' together, which torch's own counter in one process does not see."""

    def __init__(self, every_s: float = 0.5):
        self.every_s, self.peak_mb = every_s, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> dict[int, float] | None:
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout
        except (OSError, subprocess.SubprocessError):
            return None
        return {int(i): float(m) for i, m in (line.split(",") for line in out.strip().splitlines() if "," in line)}

    def _run(self) -> None:
        while not self._stop.is_set():
            got = self._sample()
            if got is None:
                return
            for i, m in got.items():
                self.peak_mb[i] = max(m, self.peak_mb.get(i, 0.0))
            self._stop.wait(self.every_s)

    def __enter__(self) -> GpuMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def config_params(model_dir: Path, lora_r: int = 0, targets: list[str] | tuple[str, ...] = ()) -> dict:
    """Parameter counts of a model folder's config, as `params` counts a loaded model (biases left out);
    LoRA of rank `lora_r` on the `targets` projections."""
    c = json.loads((Path(model_dir) / "config.json").read_text())
    h, inter, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    kv = h // c["num_attention_heads"] * c["num_key_value_heads"]
    shapes = {
        "q_proj": (h, h),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (h, h),
        "gate_proj": (h, inter),
        "up_proj": (h, inter),
        "down_proj": (inter, h),
    }
    return {
        "body": layers * sum(i * o for i, o in shapes.values()),
        "head": h * c["vocab_size"],
        "lora": layers * sum(lora_r * (i + o) for k, (i, o) in shapes.items() if k in targets),
    }


def seed_mfu(rows: list[dict], student: dict, teacher: dict, world: int, peak: float | None) -> dict:
    """Matmul FLOPs of the training part of each step (rollouts excluded) over its time: the student's forward
    and backward (input gradients through frozen weights, LoRA's weight gradients too) on every position that
    carries a gradient (GKD, LTI, anchor), the teacher's and the anchor's no-grad reference forwards, the LM head
    where it runs (completions; every anchor position). Attention is left out (a few % at these lengths).
    Rank 0 logs its own share of each batch; the others' shares are the same size, so a batch is world times
    it. The anchor's paragraphs are the same on every rank (repeated work, not shares): counted once. MFU is
    per GPU: useful FLOPs / (time x GPUs x peak)."""
    flops = secs = 0.0
    for x in rows:
        anchor = x.get("train/anchor_tokens", 0)
        grad = x.get("train/student_tokens", 0) + x.get("train/lti_tokens", 0)
        kept = x.get("train/tokens", 0) + x.get("train/lti_completion_tokens", 0)  # the latter logged since 2026-11-28
        f = (4 * student["body"] + 6 * student["lora"]) * grad + 4 * student["head"] * kept
        f += 2 * teacher["body"] * x.get("train/teacher_tokens", 0) + 2 * teacher["head"] * x.get("train/tokens", 0)
        a = (4 * student["body"] + 6 * student["lora"] + 4 * student["head"]) * anchor  # the student's pass
        a += 2 * (student["body"] + student["head"]) * anchor  # the base's reference pass
        flops += f * world + a
        secs += x["step_s"] - (x.get("rollout_s") or 0.0)
    return {
        "train_tflops_per_gpu": flops / secs / world / 1e12 if secs else None,
        "mfu": flops / secs / world / (peak * 1e12) if secs and peak else None,
    }


def full_seed(
    t_dir: Path | None,
    s_dir: Path | None,
    n: int,
    engine: str,
    work: Path,
    steps: int | None,
    gpus: int = 1,
    tiny: bool = False,
    sets: tuple[str, ...] = (),
    peak: float | None = None,
    timeout_s: float | None = None,
) -> dict:
    """`sleepctl seed` of N memories as a user runs it, in a process of its own (one GPU) or under torchrun
    (several): engine starts, teacher data and the training loop all counted. No model folders: the real pair
    and real memories (examples/ and the nights sets)."""
    from sleepctl import record

    real = s_dir is None
    home = work / f"home-{engine}-{gpus}gpu-{'real' if real else s_dir.name}"
    shutil.rmtree(home, ignore_errors=True)
    src = work / f"memories-{n}{'-real' if real else ''}.jsonl"
    lines = [json.dumps(r) for r in night_memories(n)] if real else [json.dumps({"text": m}) for m in memories(n)]
    src.write_text("".join(x + "\n" for x in lines))
    record([src], home=home)
    ov = {"engine": engine}
    if not real:
        ov.update({"profiles.small.model": str(t_dir), "profiles.large.model": str(s_dir)})
    if steps:
        ov["training.max_steps"] = steps
    if tiny:
        ov.update({"training.device": DEVICE, "eval.judge": "none", "loss.gamma": 0.0, "data.max_new_tokens": 8})
    args = ["seed", "--recipe", "qwen-small-large", "--teacher", "small", "--student", "large", "--home", str(home)]
    args += [x for k, v in ov.items() for x in ("--set", f"{k}={v}")] + [x for kv in sets for x in ("--set", kv)]
    cmd = [sys.executable, "-m", "sleepctl", *args, "--json"]
    if gpus > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(gpus), "--master_addr"]
        cmd += ["127.0.0.1", "--master_port", str(free_port()), "-m", "sleepctl", *args, "--json"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    log = work / f"{home.name}.log"
    t0 = time.time()
    with GpuMemory() as mem, log.open("w") as out:  # stdout too: vLLM writes its errors there
        # a session of its own: on a timeout the whole group goes, torchrun's workers and engines included
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            rc = f"stopped after {timeout_s:.0f} s (--seed-timeout)"
    wall = time.time() - t0
    if rc != 0:
        return {
            "engine": engine,
            "gpus": gpus,
            "memories": len(lines),
            "failed": f"exit {rc}; log {log}:\n" + log.read_text()[-3000:],
        }
    # the run from the home, not from stdout: vLLM logs to stdout too, ahead of --json's object
    run_dir = next((home / "runs").glob("seed_*/summary.json")).parent
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().split("\n") if x.strip()]
    summary = json.loads((run_dir / "summary.json").read_text())
    ro = [x["rollout/tokens_per_s"] for x in rows if x.get("rollout/tokens_per_s")]
    loop_s = sum(x["step_s"] for x in rows)
    import yaml

    ran = yaml.safe_load((run_dir / "recipe.yaml").read_text())  # what the run trained, overrides included
    batch = ran["training"]["batch_size"]
    names = {role: ran[role] for role in ("teacher", "student")}
    names["teacher"] = names["student"] if names["teacher"] == "self" else names["teacher"]
    models = {role: _resolved(ran["profiles"].get(x, {}).get("model", x)) for role, x in names.items()}
    res = {
        "engine": engine,
        "gpus": gpus,
        "models": "real pair" if real else f"random {t_dir.name} -> {s_dir.name}",
        "memories": len(lines),
        "steps": summary["steps"],
        "batch_size": batch,
        "examples": summary.get("examples"),
        "wall_s": wall,
        "training_loop_s": loop_s,
        "steps_per_s": len(rows) / loop_s if loop_s else None,
        "sequences_per_s": len(rows) * batch / loop_s if loop_s else None,
        "rollout_tokens_per_s_mean": sum(ro) / len(ro) if ro else None,
        "train_s_per_step_mean": sum(x["step_s"] - (x.get("rollout_s") or 0.0) for x in rows) / len(rows),
        "rollout_s_per_step_mean": sum(x.get("rollout_s") or 0.0 for x in rows) / len(rows),
        "peak_memory_mb": summary.get("peak_memory_mb"),
        "trainer_peak_memory_mb_per_rank": summary.get("peak_memory_mb_per_rank", [summary.get("peak_memory_mb")]),
        "gpu_peak_memory_mb": mem.peak_mb,  # nvidia-smi: trainers and engine processes, every GPU of the machine
        "engine_info": summary.get("engine"),
    }
    s_cfg = config_params(models["student"], ran["lora"]["r"], ran["lora"]["target_modules"])
    t_cfg = config_params(models["teacher"])
    res.update(seed_mfu(rows, s_cfg, t_cfg, gpus, peak))
    res["params"] = {"student": s_cfg, "teacher": t_cfg}
    return res


def night_unavailable(has_vllm: bool, tiny: bool) -> str | None:
    """Why the real night cannot run here (None: it can): it needs vLLM, a GPU and the two real models offline."""
    if tiny:
        return "--tiny measures toy shapes; the night runs the real pair"
    if not has_vllm:
        return "vLLM is not installed"
    from sleepctl.errors import SleepError

    try:
        for alias in ("qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"):
            _resolved(alias)
    except SleepError as e:
        return f"the real pair is not installed ({e}): make install-qwen install-qwen-large"
    return None


def _resolved(alias: str) -> Path:
    from sleepctl.models import resolve

    return Path(resolve(alias).path)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def night_memories(n: int) -> list[dict]:
    """N real memories with their user probes: examples/ first, then the multi-night sets."""
    files = [ROOT / "examples" / "memories.jsonl"] + sorted((ROOT / "benchmarks" / "nights").glob("night*.jsonl"))
    recs = []
    for f in files:
        for line in f.read_text().split("\n"):  # JSONL: "\n" only
            if line.strip():
                r = json.loads(line)
                r.pop("corrects", None)
                r["source"] = f.name
                recs.append(r)
    return recs[:n]


def full_night(n: int, work: Path, overrides: dict, teacher: str | None = None) -> dict:
    """A night with the real pair: seed + dream (whose gate evaluates) of N memories, engine starts included;
    then an eval for recall on examples/ probes (not counted in the night)."""
    import yaml

    from sleepctl import record
    from sleepctl.dream import dream
    from sleepctl.engines import release_engines
    from sleepctl.evaluate import evaluate
    from sleepctl.seed import seed

    release_engines()  # a night starts its own engines: their start is part of its time
    home = work / f"night-{n}"
    src = work / f"night-{n}.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in night_memories(n)))
    record([src], home=home)
    ov = {"engine": "vllm", **overrides}
    torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    s = seed("qwen-small-large", home=home, teacher=teacher, student="large", overrides=ov, keep_engines=True)
    t_seed = time.time() - t0
    d = dream("qwen-small-large", home=home, overrides=ov, consolidate=False, keep_engines=True)
    wall = time.time() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30
    ev = evaluate(home=home, overrides=ov, keep_engines=True)
    release_engines()
    from sleepctl.memories import open_store

    with open_store(home) as st:
        from_examples = {t.id for t in st.traces() if t.source.startswith("memories.jsonl")}
    rows = [json.loads(x) for x in (Path(s.run_dir) / "metrics.jsonl").read_text().split("\n") if x.strip()]
    ro = [(x.get("rollout/tokens") or 0, x.get("rollout_s") or 0.0) for x in rows]

    def recall(method: str, ids: set[str] | None, origin: str | None = "user") -> float | None:
        xs = [
            r.contains
            for m in ev.methods
            if m.method == method
            for r in m.results
            if (ids is None or r.trace_id in ids) and (origin is None or r.origin == origin)
        ]
        return sum(xs) / len(xs) if xs else None

    return {
        "memories": n,
        "teacher": yaml.safe_load((Path(s.run_dir) / "recipe.yaml").read_text())["teacher"],  # as the run resolved it
        "overrides": ov,
        "night_wall_s": wall,
        "seed_s": t_seed,
        "dream_s": wall - t_seed,
        "steps": s.steps,
        "dream": {
            "status": d.status,
            "made_current": d.made_current,
            "dreams": d.dreams,
            "kept": d.kept,
            "rewarded": d.rewarded,
            "invented": d.invented,
            "phases_s": d.phases_s,
        },
        "in_seed_rollout_tokens_per_s": sum(t for t, _ in ro) / max(1e-9, sum(x for _, x in ro)),
        "train_s_per_step": sum(x["step_s"] - (x.get("rollout_s") or 0.0) for x in rows) / len(rows),
        "peak_gpu_memory_gb": peak,
        "recall_examples_user": {m: recall(m, from_examples) for m in ("base", "in-context", "sleep")},
        "recall_all": {m: recall(m, None, None) for m in ("base", "in-context", "sleep")},
        "ppl_change": ev.perplexity["sleep"] / ev.perplexity["base"] - 1,
        "engine": json.loads((Path(s.run_dir) / "summary.json").read_text()).get("engine"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--memories", type=int, default=100, help="memories in the full seed")
    ap.add_argument(
        "--seed-engines",
        default="auto",
        help="engines of the full seed: auto (vllm if installed, else hf), hf, vllm, hf,vllm, none",
    )
    ap.add_argument("--seed-steps", type=int, help="optimizer steps of the full seed (default: the recipe's cap, 300)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--out", default=str(ROOT / ".bench" / "gpu"))
    ap.add_argument("--work", help="scratch folder for the random models (default: a temporary one)")
    ap.add_argument("--tiny", action="store_true", help="toy shapes, runs on CPU: checks the script, measures nothing")
    ap.add_argument("--profile", action="store_true", help="also write a kernel profile of the last seed step measured")
    ap.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"seed-step variants to measure (run in this order: {', '.join(VARIANTS)})",
    )
    ap.add_argument(
        "--train-batches", default="16,24,64", help="seed-step batch sizes (24: qwen-small-large's batch_size)"
    )
    ap.add_argument(
        "--parts",
        help="what to measure: hf (HF generate), train (seed step variants), vllm, seed (a full seed on random "
        "weights), night (a full night of the real pair: needs the offline models and vLLM). Default: all of them, "
        "the night skipped with its reason where it cannot run; named here, a part that cannot run is an error",
    )
    ap.add_argument(
        "--gpus",
        default="1",
        help="processes (one per GPU) of the full seed, e.g. 1,2: one run per count, several through torchrun",
    )
    ap.add_argument("--student", choices=sorted(SHAPES), default="1.5b", help="student shape of the full seed")
    ap.add_argument(
        "--seed-models",
        choices=["random", "real"],
        default="random",
        help="full seed on random weights of the shapes, or on the real pair and real memories (offline models)",
    )
    ap.add_argument("--seed-set", action="append", default=[], help="recipe override for the full seed (k=v)")
    ap.add_argument("--seed-timeout", type=float, default=3600, help="seconds a full seed may run before it is stopped")
    ap.add_argument("--night-memories", type=int, default=100)
    ap.add_argument("--night-teacher", help="teacher of the real night: small or self (default: the recipe's, self)")
    ap.add_argument("--night-set", action="append", default=[], help="recipe override for the real night (k=v)")
    args = ap.parse_args()

    global DEVICE
    if args.tiny:
        DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
    elif not torch.cuda.is_available():
        print(
            "gpu_bench: no CUDA GPU is visible; this benchmark measures GPU throughput (make bench runs on CPU)",
            file=sys.stderr,
        )
        sys.exit(2)
    if args.seed_models == "real" and args.student != "1.5b":
        print(
            f"gpu_bench: --student {args.student} is a random-weight shape; --seed-models real trains the real 1.5B",
            file=sys.stderr,
        )
        sys.exit(2)
    try:
        gpu_counts = sorted({int(x) for x in args.gpus.split(",")})
    except ValueError:
        gpu_counts = [0]
    # --tiny on a CPU runs its processes there (gloo); on a GPU machine each needs a GPU of its own
    if min(gpu_counts) < 1 or (DEVICE == "cuda" and max(gpu_counts) > torch.cuda.device_count()):
        print(
            f"gpu_bench: --gpus {args.gpus}: give process counts from 1"
            + (f" to the {torch.cuda.device_count()} GPUs here" if DEVICE == "cuda" else "")
            + ", comma-separated (1,2)",
            file=sys.stderr,
        )
        sys.exit(2)
    bad = [v for v in args.variants.split(",") if v not in VARIANTS]
    try:
        train_batches = [int(b) for b in args.train_batches.split(",")]
    except ValueError:
        train_batches = [0]
    if bad or min(train_batches) < 1:
        print(
            f"gpu_bench: --variants takes {', '.join(VARIANTS)} and --train-batches positive integers, "
            f"comma-separated (got --variants {args.variants} --train-batches {args.train_batches})",
            file=sys.stderr,
        )
        sys.exit(2)
    from peft import LoraConfig, get_peft_model

    from sleepctl.recipe import parse_overrides
    from sleepctl.training import bf16_compute
    from sleepctl.vllm_engine import unavailable_reason

    has_vllm = unavailable_reason() is None
    engines = {"auto": ["vllm" if has_vllm else "hf"], "none": []}.get(args.seed_engines, args.seed_engines.split(","))
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="sleepctl-gpubench-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("SLEEPCTL_CACHE", str(work / "cache"))
    peak = peak_tflops() if DEVICE == "cuda" else None
    t_all = time.time()
    res: dict = {
        "machine": (torch.cuda.get_device_name(0) if DEVICE == "cuda" else "CPU") + f", {platform.machine()}",
        "tiny": args.tiny,
        "versions": {"torch": torch.__version__, "cuda": torch.version.cuda},
        "peak_bf16_tflops": peak,
        "new_tokens": args.new_tokens,
    }
    import transformers

    res["versions"]["transformers"] = transformers.__version__
    if has_vllm:
        import vllm

        res["versions"]["vllm"] = vllm.__version__
    else:
        res["vllm_skipped"] = unavailable_reason()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"gpu-bench-{time.strftime('%Y%m%dT%H%M%S')}.json"

    def say(msg: str) -> None:  # progress, and the figures so far on disk: a cut-off run still reports
        print(f"[{time.time() - t_all:6.0f} s] {msg}", file=sys.stderr, flush=True)
        path.write_text(json.dumps(res, indent=2))

    tok = build_tokenizer(memories(max(args.memories, 200)), work / "tok")
    dirs = {k: work / k for k in SHAPES}
    parts = set((args.parts or "hf,train,vllm,seed,night").split(","))
    if "night" in parts:
        why = night_unavailable(has_vllm, args.tiny)
        if why and args.parts:
            print(f"gpu_bench: --parts night cannot run here: {why}", file=sys.stderr)
            sys.exit(2)
        if why:
            parts.discard("night")
            res["night_skipped"] = why
    # the random pair, unless only the real models run (they would hold GPU memory the engines then lack)
    pair = bool(parts & {"hf", "train", "vllm"}) or ("seed" in parts and args.seed_models == "random")
    models = {k: build_model(k, tok, dirs[k], seed=i, tiny=args.tiny) for i, k in enumerate(PAIR) if pair}
    new = 8 if args.tiny else args.new_tokens
    res["new_tokens"] = new
    res["params"] = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    say(f"random models built: {res['params']}")

    # rollouts through Hugging Face generate: plain, and through the LoRA the HF engine samples from
    res["hf_rollouts"] = {}
    for k, m in models.items() if "hf" in parts else ():
        res["hf_rollouts"][k] = {"batch64_plain": hf_rollouts(m, 64, new)}
        say(f"HF generate {k}: {res['hf_rollouts'][k]['batch64_plain']:.0f} tok/s")
    rank = {"0.5b": 16, "1.5b": 32}
    peft = {}
    for k, m in models.items():
        peft[k] = get_peft_model(
            m,
            LoraConfig(
                r=rank[k],
                lora_alpha=2 * rank[k],
                target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            ),
        )
        if "hf" not in parts:
            continue
        res["hf_rollouts"][k][f"batch64_lora_r{rank[k]}"] = hf_rollouts(peft[k], 64, new)
        with bf16_compute(peft[k]):  # what the HF engine does now on CUDA
            res["hf_rollouts"][k][f"batch64_lora_r{rank[k]}_bf16"] = hf_rollouts(peft[k], 64, new)
        say(f"HF generate {k} with LoRA: {json.dumps({x: round(y) for x, y in res['hf_rollouts'][k].items()})} tok/s")

    # a seed step: teacher 0.5b scores, student 1.5b + LoRA r=32 trains (the qwen-small-large recipe)
    teacher = peft["0.5b"].get_base_model() if peft else None
    res["train_step"] = []
    variants = [v for v in VARIANTS if v in args.variants.split(",")]
    batches = [16] if args.tiny else train_batches
    for variant in variants if "train" in parts else ():
        for b in batches:
            last = variant == variants[-1] and b == batches[-1]
            prof_path = out / "seed-step-profile.txt" if args.profile and last else None
            # --tiny checks the path, not inductor's code generation (minutes of C++ on a small CPU)
            r = train_step_bench(
                teacher, peft["1.5b"], b, variant, peak, prof_path, "eager" if args.tiny else "inductor"
            )
            res["train_step"].append(r)
            mfu = "-" if r["mfu"] is None else format(r["mfu"], ".1%")
            say(f"train step batch {b}, {variant}: {r['step_s'] * 1000:.0f} ms, MFU {mfu}")

    if has_vllm and not args.tiny and "vllm" in parts:
        res["vllm"] = {}
        for k in SHAPES:
            with torch.no_grad():
                for n, p in peft[k].named_parameters():
                    if "lora_B" in n:
                        p.normal_(0, 0.01)
            res["vllm"][k] = vllm_bench(dirs[k], peft[k], tok, rank[k], [64, 256], new)
            say(
                f"vLLM {k}: {json.dumps({x: round(y, 3) if isinstance(y, float) else y for x, y in res['vllm'][k].items() if x != 'logprob_check'})}"
            )

    del peft, models, teacher
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    res["full_seed"] = []
    if "seed" in parts and args.seed_models == "random" and args.student not in PAIR:
        build_model(args.student, tok, dirs[args.student], seed=2, tiny=args.tiny)  # on disk is enough: let it go
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    for e in engines if "seed" in parts else ():
        for g in gpu_counts:
            say(f"full seed on {args.memories} memories, engine {e}, {g} GPU(s)…")
            t_dir, s_dir = (None, None) if args.seed_models == "real" else (dirs["0.5b"], dirs[args.student])
            one = full_seed(
                t_dir,
                s_dir,
                args.memories,
                e,
                work,
                args.seed_steps,
                g,
                args.tiny,
                args.seed_set,
                peak,
                args.seed_timeout,
            )
            res["full_seed"].append(one)
            if "failed" in one:
                say(f"full seed, engine {e}, {g} GPU(s) failed:\n{one['failed']}")
                continue
            say(f"full seed, engine {e}, {g} GPU(s): {one['wall_s']:.0f} s, loop {one['training_loop_s']:.0f} s")
    if "night" in parts:
        say(f"a full night of the real pair on {args.night_memories} memories…")
        res["full_night"] = full_night(args.night_memories, work, parse_overrides(args.night_set), args.night_teacher)
        say(f"full night: {res['full_night']['night_wall_s']:.0f} s")
    res["bench_wall_s"] = time.time() - t_all

    path.write_text(json.dumps(res, indent=2))
    print_table(res)
    print(f"results: {path}")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    failed = [f"{s['engine']}, {s['gpus']} GPU" for s in res["full_seed"] if "failed" in s]
    if failed:
        print(f"gpu_bench: full seed failed ({'; '.join(failed)}): the JSON holds each log's tail", file=sys.stderr)
        sys.exit(1)


def print_table(res: dict) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=f"sleepctl GPU bench, {res['machine']}, random weights of Qwen2.5 shapes, bf16")
    t.add_column("what")
    t.add_column("value", justify="right")
    nt = res["new_tokens"]
    for k, v in res["hf_rollouts"].items():
        for name, x in v.items():
            t.add_row(f"rollout tok/s, HF generate, {k}, {name}, {nt} new", f"{x:,.0f}")
    for k, v in res.get("vllm", {}).items():
        for name, x in v.items():
            if name.startswith("rollout_tokens_per_s"):
                t.add_row(f"rollout tok/s, vLLM + LoRARequest, {k}, {name.split('_')[-1]}, {nt} new", f"{x:,.0f}")
        t.add_row(
            f"vLLM {k}: engine start / sleep / wake / LoRA sync",
            f"{v['start_s']:.0f} s / {v['sleep_s']:.2f} s / {v['wake_s']:.2f} s / {v['lora_sync_s']:.2f} s",
        )
        t.add_row(f"vLLM {k}: memory freed by sleep", f"{v['freed_by_sleep_gb']:.1f} GB")
        if "lora_sync_s_tmpfs" in v:
            t.add_row(
                f"vLLM {k}: LoRA sync, tmpfs (now) / disk (before)",
                f"{v['lora_sync_s_tmpfs'] * 1000:.0f} ms / {v['lora_sync_s_disk'] * 1000:.0f} ms",
            )
        c = v["logprob_check"]
        t.add_row(
            f"vLLM {k}: |log-prob - PEFT| mean / max (LoRA effect)",
            f"{c['mean_abs_diff']:.4f} / {c['max_abs_diff']:.3f} ({c['lora_effect']:.3f})",
        )
    for r in res["train_step"]:
        mfu = "-" if r["mfu"] is None else f"{r['mfu']:.1%}"
        t.add_row(
            f"seed step, batch {r['batch']}, {r['variant']}: {r['change']}",
            f"{r['step_s'] * 1000:.0f} ms, {r['trained_tokens_per_s']:,.0f} trained tok/s, MFU {mfu}"
            + ("" if r["peak_memory_gb"] is None else f", {r['peak_memory_gb']:.1f} GB")
            + (f", first step {r['first_step_s']:.0f} s" if r["variant"] == "compiled" else ""),
        )
        t.add_row(
            f"teacher scoring tok/s, batch {r['batch']}, {r['variant']}", f"{r['teacher_scoring_tokens_per_s']:,.0f}"
        )
    one_gpu = {(s["engine"], s.get("models")): s for s in res["full_seed"] if s.get("gpus") == 1 and "failed" not in s}
    for s in res["full_seed"]:
        what = f"full seed, {s.get('models', '')}, {s['memories']} memories, engine {s['engine']}, {s['gpus']} GPU"
        if "failed" in s:
            t.add_row(what, "failed (see the JSON)")
            continue
        mfu = "-" if s.get("mfu") is None else f"{s['mfu']:.1%}"
        t.add_row(
            what + f", {s['steps']} steps of {s['batch_size']}",
            f"{s['wall_s']:.0f} s (loop {s['training_loop_s']:.0f} s, {s['sequences_per_s']:.1f} seq/s, MFU {mfu})",
        )
        base = one_gpu.get((s["engine"], s.get("models")))
        if base is not None and s["gpus"] > 1:
            t.add_row(
                f"  training-loop throughput, {s['gpus']} GPUs against 1",
                f"{s['sequences_per_s'] / base['sequences_per_s']:.2f}x",
            )
        t.add_row(
            "  per step: rollouts / the rest; rollout tok/s",
            f"{s['rollout_s_per_step_mean'] * 1000:.0f} ms / {s['train_s_per_step_mean'] * 1000:.0f} ms; "
            + ("-" if s["rollout_tokens_per_s_mean"] is None else f"{s['rollout_tokens_per_s_mean']:,.0f}"),
        )
        gpu = s.get("gpu_peak_memory_mb") or {}
        ranks = [x for x in s.get("trainer_peak_memory_mb_per_rank") or [] if x is not None]
        t.add_row(
            "  peak memory: per GPU (nvidia-smi, engines included) / trainers (torch)",
            (" + ".join(f"{v / 1024:.1f}" for _, v in sorted(gpu.items())) or "-")
            + " GiB / "
            + (" + ".join(f"{v / 1024:.1f}" for v in ranks) or "-")
            + " GiB",
        )
    if "full_night" in res:
        n = res["full_night"]
        r = n["recall_examples_user"]
        t.add_row(
            f"full night, real pair, {n['memories']} memories: seed + dream (gate included), engine starts included",
            f"{n['night_wall_s']:.0f} s (seed {n['seed_s']:.0f} s, dream {n['dream_s']:.0f} s), peak "
            f"{n['peak_gpu_memory_gb']:.1f} GB",
        )
        ph = n["dream"].get("phases_s") or {}
        t.add_row("  the dream's phases", ", ".join(f"{k} {v:.0f} s" for k, v in ph.items()) or "-")
        t.add_row(
            "  in-seed rollouts / training per step",
            f"{n['in_seed_rollout_tokens_per_s']:,.0f} tok/s / {n['train_s_per_step'] * 1000:.0f} ms",
        )
        t.add_row(
            "  recall of examples/ user probes: base / in-context / after the night",
            " / ".join("-" if r[m] is None else f"{100 * r[m]:.1f}%" for m in ("base", "in-context", "sleep"))
            + f", ppl {100 * n['ppl_change']:+.1f}%",
        )
    if "vllm_skipped" in res:
        t.add_row("vLLM", escape(f"skipped: {res['vllm_skipped']}"))
    if "night_skipped" in res:
        t.add_row("full night, real pair", escape(f"skipped: {res['night_skipped']}"))
    Console().print(t)


if __name__ == "__main__":
    main()
