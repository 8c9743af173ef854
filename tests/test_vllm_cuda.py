"""The vLLM engine for real: needs vLLM and a CUDA GPU, skipped (with the reason) anywhere else.

Run on a GPU machine with `pytest -m cuda -v`. The model is a small random-weight Qwen2 with the real
SmolLM2 tokenizer: head size 64 so vLLM's attention kernels take it, small enough to start in seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sleepctl.vllm_engine import unavailable_reason

from .conftest import EXAMPLES, cli, randomize_lora_b, write_recipe

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(unavailable_reason() is not None, reason=f"{unavailable_reason()}"),
]


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from sleepctl.models import load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        initializer_range=0.1,
    )
    path = tmp_path_factory.mktemp("qwen") / "model"
    Qwen2ForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def trainer(qwen_dir):
    from sleepctl.models import load_model
    from sleepctl.recipe import Lora
    from sleepctl.training import add_lora

    base, tok = load_model(str(qwen_dir), "cuda", "bfloat16")
    return add_lora(base, Lora(r=8, alpha=16)), tok


@pytest.fixture(scope="module")
def engine(qwen_dir, trainer):
    from sleepctl.recipe import VLLM
    from sleepctl.vllm_engine import VLLMEngine

    _, tok = trainer
    e = VLLMEngine(qwen_dir, tok, VLLM(sleep=True, gpu_memory_utilization=0.2, max_model_len=1024), lora_rank=8, seed=0)
    yield e
    e.close()


def test_logprobs_match_the_trainer_under_a_lora(engine, trainer):
    from sleepctl.vllm_engine import check_logprobs

    model, tok = trainer
    seqs = [tok(t)["input_ids"] for t in ("The build server moved to Tallinn.", "Orla signed off the March budget.")]
    rep = check_logprobs(engine, model, seqs, tok.pad_token_id, tolerance=0.05)
    print("log-prob check:", json.dumps(rep))
    assert rep["probe_adapter"] and rep["lora_effect"] > rep["mean_abs_diff"]


def test_sync_serves_a_new_id_per_version_and_sampling_is_seeded(engine, trainer):
    model, tok = trainer
    engine.sync(model, version=0)
    first = engine.lora.lora_int_id
    engine.sync(model, version=0)  # same weights: nothing to do
    assert engine.lora.lora_int_id == first
    a = engine.generate(["Where is the build server?"] * 2, max_new_tokens=12, temperature=1.0, num_samples=3, seed=5)
    b = engine.generate(["Where is the build server?"] * 2, max_new_tokens=12, temperature=1.0, num_samples=3, seed=5)
    assert len(a.completion_ids) == 6 and a.completion_ids == b.completion_ids
    assert all(0 < len(c) <= 12 for c in a.completion_ids)
    assert all(tok.eos_token_id not in c[:-1] for c in a.completion_ids)  # nothing past a stop
    randomize_lora_b(model, 0.5)
    engine.sync(model, version=1)
    assert engine.lora.lora_int_id != first and engine.version == 1
    c = engine.generate(["Where is the build server?"] * 2, max_new_tokens=12, temperature=1.0, num_samples=3, seed=5)
    assert c.completion_ids != a.completion_ids  # the new adapter answers, not a cached old one


def test_sleep_gives_memory_back_and_wake_restores_service(engine):
    free0 = torch.cuda.mem_get_info()[0]
    engine.sleep()
    freed = torch.cuda.mem_get_info()[0] - free0
    print(f"sleep freed {freed / 2**30:.2f} GiB")
    assert freed > 0.5 * 2**30  # the KV cache at least (0.2 of the GPU)
    engine.wake()
    ro = engine.generate(["Hello"], max_new_tokens=4, temperature=0.0)
    assert len(ro.completion_ids) == 1 and len(ro.completion_ids[0]) >= 1


def test_seed_with_the_vllm_engine(tmp_path, qwen_dir):
    """End to end: teacher data and rollouts through vLLM, the start-up check recorded with the run."""
    home = tmp_path / "home"
    assert cli("record", str(EXAMPLES), "--home", str(home)).returncode == 0
    recipe = write_recipe(tmp_path / "r.yaml", str(qwen_dir), engine="vllm", vllm={"gpu_memory_utilization": 0.2})
    r = cli("seed", "--recipe", str(recipe), "--home", str(home), "--set", "training.device=cuda")
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    runs = [p for p in (home / "runs").iterdir() if p.name.startswith("seed_")]
    summary = json.loads((runs[0] / "summary.json").read_text())
    info = summary["engine"]
    print("engine:", json.dumps(info))
    assert info["engine"] == "vllm" and info["logprob_check"]["mean_abs_diff"] <= 0.05
    assert info["timings"]["syncs"] >= 1


def test_two_nights_dream_eval_and_consolidation_through_one_engine(tmp_path, qwen_dir):
    """A night on the real engine: one vLLM engine per process serves stack + adapter as one LoRA."""
    from sleepctl import record
    from sleepctl.consolidate import consolidate
    from sleepctl.dream import dream
    from sleepctl.engines import _SHARED, release_engines
    from sleepctl.evaluate import evaluate
    from sleepctl.seed import seed

    home = tmp_path / "home"
    lines = EXAMPLES.read_text().splitlines()
    (tmp_path / "a.jsonl").write_text("\n".join(lines[:4]) + "\n")
    (tmp_path / "b.jsonl").write_text("\n".join(lines[4:7]) + "\n")
    recipe = write_recipe(
        tmp_path / "r.yaml",
        str(qwen_dir),
        engine="vllm",
        vllm={"gpu_memory_utilization": 0.2, "max_model_len": 2048},
        training={"device": "cuda", "steps_per_generation": 2, "max_steps": 4},
        dream={
            "grounded": False,
            "dreams_per_memory": 2,
            "max_new_tokens": 8,
            "top_k": 1,
            "random_b": 0,
            "train_steps": 2,
        },
        replay={"fraction": 0.5},
        anchor={"kl_coef": 0.5, "batch_size": 2, "max_tokens": 32, "drift_prompts": 4},
        consolidate={"max_adapters": 1, "steps_per_memory": 1.0, "max_steps": 4},
    )
    try:
        record([tmp_path / "a.jsonl"], home=home)
        first = seed(str(recipe), home=home, show_progress=False, keep_engines=True)
        record([tmp_path / "b.jsonl"], home=home)
        second = seed(str(recipe), home=home, show_progress=False, keep_engines=True)
        assert len(_SHARED) == 1  # the 'self' teacher is the student's engine with no adapter
        d = dream(str(recipe), home=home, show_progress=False, consolidate=False, keep_engines=True)
        rep = evaluate(home=home, keep_engines=True)
        c = consolidate(str(recipe), home=home, if_needed=True, show_progress=False, keep_engines=True)
        assert len(_SHARED) == 1
    finally:
        release_engines()
    for r in (first, second):
        check = json.loads((Path(r.run_dir) / "summary.json").read_text())["engine"]
        print("engine:", json.dumps(check))
        assert check["logprob_check"]["mean_abs_diff"] <= 0.05
    assert second.replayed == 4 and d.status in ("done", "not-current", "nothing")
    assert rep.kl_drift is not None and c.status in ("done", "not-current")
