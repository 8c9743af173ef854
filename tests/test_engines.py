"""Rollout engines. What a CPU can check runs here; what needs vLLM on a GPU is marked `cuda` and skipped
with the reason where it cannot run (tests/test_vllm_cuda.py)."""

from __future__ import annotations

import json

import pytest
import torch

from sleepctl.engines import HFEngine, lora_capacity, make_engine
from sleepctl.errors import ModelError
from sleepctl.models import load_model
from sleepctl.recipe import VLLM, Lora, load_recipe
from sleepctl.training import add_lora, completion_logits
from sleepctl.vllm_engine import (
    check_logprobs,
    engine_kwargs,
    live_lora,
    lora_slot,
    trainer_logprobs,
    unavailable_reason,
)

from .conftest import EXAMPLES, cli, randomize_lora_b, write_recipe


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    model, tok = load_model(str(tiny_dir), "cpu", "float32")
    return model, tok


def naive_completion_logits(model, prompts, completions):
    """One row at a time, no padding: what the batched version must reproduce."""
    rows = []
    for p, c in zip(prompts, completions):
        ids = torch.tensor([p + c])
        logits = model(input_ids=ids).logits[0]
        rows.append(logits[len(p) - 1 : len(p) - 1 + len(c)])
    return rows


def test_completion_logits_match_unpadded_rows(tiny):
    model, tok = tiny
    prompts = [[10, 11, 12, 13, 14, 15], [20, 21], [30, 31, 32, 33]]
    comps = [[40, 41], [50, 51, 52, 53, 54], [60]]
    with torch.no_grad():
        batched, mask = completion_logits(model, prompts, comps, tok.pad_token_id)
        naive = naive_completion_logits(model, prompts, comps)
    assert batched.shape[:2] == (3, 5)
    assert mask.tolist() == [[True, True, False, False, False], [True] * 5, [True, False, False, False, False]]
    for i, ref in enumerate(naive):
        torch.testing.assert_close(batched[i, : len(comps[i])], ref, atol=1e-4, rtol=1e-4)


def test_hf_engine_lifecycle_calls_are_harmless(tiny):
    model, tok = tiny
    e = make_engine("hf", model, tok, 4)
    assert isinstance(e, HFEngine)
    e.sync(model, version=3)
    e.sleep()
    e.wake()
    ro = e.generate(["Hello", "Where is"], max_new_tokens=5, temperature=0.7, num_samples=2, seed=1)
    assert len(ro.completion_ids) == len(ro.texts) == len(ro.prompt_ids) == 4
    assert all(0 < len(c) <= 5 for c in ro.completion_ids)
    e.close()


def test_lora_slot_rounds_up_to_a_served_rank():
    assert lora_slot(8) == 8
    assert lora_slot(12) == 16
    assert lora_slot(32) == 32
    assert lora_slot(65) == 128
    with pytest.raises(ModelError, match="larger than vLLM serves"):
        lora_slot(2048)


def test_lora_capacity_keeps_one_engine_through_a_refused_consolidation():
    """The H100 five-night run restarted vLLM when a refused consolidation left five adapters (rank 160)
    under an engine sized for four: the slot chosen on night 1 must already hold that stack."""
    cfg, _ = load_recipe("qwen-small-large", {"consolidate.max_adapters": 3})
    first = lora_slot(lora_capacity(cfg, 0))
    # dream consolidates past 3 adapters; refused, the next night trains a fifth on a frozen four
    assert all(lora_slot(lora_capacity(cfg, frozen)) == first for frozen in range(0, 5))
    assert first >= cfg.lora.r * 5
    # after a consolidation the stack's root is the wider consolidated adapter: root + 3 nights + 1 training
    assert cfg.consolidate.rank > cfg.lora.r and lora_capacity(cfg, 4) >= cfg.consolidate.rank + cfg.lora.r * 4
    assert lora_capacity(cfg, 9) >= cfg.lora.r * 10  # deeper than planned for: still served, by a restart


def test_engine_kwargs_follow_the_recipe():
    kw = engine_kwargs(VLLM(), lora_rank=24, seed=7)
    assert kw["enable_lora"] and kw["max_lora_rank"] == 32 and kw["max_loras"] == 1
    assert kw["skip_tokenizer_init"] and kw["seed"] == 7 and kw["dtype"] == "bfloat16"
    assert kw["compilation_config"] == {"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY"}
    assert not kw["enable_sleep_mode"] and not kw["enforce_eager"]
    kw = engine_kwargs(VLLM(sleep=True, cuda_graphs=False, gpu_memory_utilization=0.5), lora_rank=None, seed=0)
    assert "enable_lora" not in kw and kw["enforce_eager"] and kw["enable_sleep_mode"]
    assert kw["gpu_memory_utilization"] == 0.5
    assert engine_kwargs(VLLM(compile=True), None, 0)["compilation_config"] == {"mode": 3}


def test_saved_adapter_is_a_peft_adapter_with_the_same_outputs(tiny_dir, tmp_path):
    from peft import PeftModel

    base, tok = load_model(str(tiny_dir), "cpu", "float32")
    model = add_lora(base, Lora(r=4, alpha=8))
    randomize_lora_b(model, 0.05)
    from sleepctl.adapters import write_lora

    write_lora(live_lora(model), tmp_path / "a")  # what vLLM receives on each sync
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8
    fresh, _ = load_model(str(tiny_dir), "cpu", "float32")
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "a")
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, loaded(input_ids=ids).logits
        with model.disable_adapter():
            plain = model(input_ids=ids).logits
    assert (a - plain).abs().max() > 0.05  # the adapter matters, so agreement below means something
    torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)  # the payload is bf16


class TrainerAsEngine:
    """A stand-in for vLLM in the check below: it answers log-probs from a model of our choosing.

    It is not a fake of vLLM's behaviour; it lets the test drive `check_logprobs` into both outcomes.
    """

    def __init__(self, scorer, pad):
        self.scorer, self.pad, self.version, self.synced = scorer, pad, None, []

    def sync(self, model, version):
        self.synced.append(version)
        self.version = version

    def prompt_logprobs(self, seqs):
        return trainer_logprobs(self.scorer, seqs, self.pad)


def test_logprob_check_passes_on_agreement_and_restores_a_fresh_adapter(tiny_dir):
    base, tok = load_model(str(tiny_dir), "cpu", "float32")
    model = add_lora(base, Lora(r=4, alpha=8))
    seqs = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    eng = TrainerAsEngine(model, tok.pad_token_id)
    rep = check_logprobs(eng, model, seqs, tok.pad_token_id, tolerance=0.01)
    assert rep["probe_adapter"] and rep["tokens"] == 7
    assert rep["mean_abs_diff"] < 1e-6
    assert rep["lora_effect"] > 0.01  # the probe adapter really moved the log-probs: the check tested something
    assert all(float(p.abs().max()) == 0 for n, p in model.named_parameters() if "lora_B" in n)  # restored
    assert eng.synced == [-1] and eng.version is None  # the probe adapter is never left as the served one


def test_logprob_check_refuses_an_engine_that_disagrees(tiny_dir, tiny_other_tok_dir):
    base, tok = load_model(str(tiny_dir), "cpu", "float32")
    model = add_lora(base, Lora(r=4, alpha=8))
    other, _ = load_model(str(tiny_other_tok_dir), "cpu", "float32")
    with pytest.raises(ModelError, match="log-probs under the adapter differ"):
        check_logprobs(TrainerAsEngine(other, tok.pad_token_id), model, [[5, 6, 7, 8]], tok.pad_token_id, 0.05)


@pytest.mark.skipif(unavailable_reason() is None, reason="vLLM and CUDA are both here")
def test_vllm_engine_says_why_it_cannot_run(tiny):
    model, tok = tiny
    with pytest.raises(ModelError, match="engine: vllm: vLLM (is not installed|needs a CUDA GPU)") as e:
        make_engine("vllm", model, tok, model_dir="unused", lora_rank=8)
    assert "engine=hf" in e.value.hint


@pytest.mark.skipif(unavailable_reason() is None, reason="vLLM and CUDA are both here")
def test_seed_with_vllm_engine_fails_fast_and_stores_nothing(tmp_path, tiny_dir):
    home = tmp_path / "home"
    assert cli("record", str(EXAMPLES), "--home", str(home)).returncode == 0
    before = cli("status", "--home", str(home), "--json").stdout
    r = cli(
        "seed",
        "--recipe",
        str(write_recipe(tmp_path / "r.yaml", str(tiny_dir))),
        "--home",
        str(home),
        "--set",
        "engine=vllm",
    )
    err = r.stderr.decode()
    assert r.returncode == 1, err
    assert "engine: vllm" in err and "engine=hf" in err
    if "not installed" in err:
        assert "sleepctl[vllm]" in err  # the install command survives the terminal markup
    assert cli("status", "--home", str(home), "--json").stdout == before  # nothing stored changed
    assert not (home / "runs").exists() or not any((home / "runs").iterdir())


class OffByShare:
    """Answers the trainer's log-probs moved `share` of the way back towards the base's: a LoRA path that
    rounds (small share) or one that drops the adapter (share 1)."""

    def __init__(self, model, pad, share):
        self.model, self.pad, self.share, self.version = model, pad, share, None

    def sync(self, model, version):
        self.version = version

    def prompt_logprobs(self, seqs):
        ours = trainer_logprobs(self.model, seqs, self.pad)
        with self.model.disable_adapter():
            base = trainer_logprobs(self.model, seqs, self.pad)
        return [[o - self.share * (o - b) for o, b in zip(x, y)] for x, y in zip(ours, base)]


def test_logprob_check_allows_rounding_that_grows_with_the_adapter_but_not_a_dropped_adapter(tiny_dir):
    """Allowed: tolerance + rel_tolerance x the adapter's effect. 3% of the effect passes at 5%, fails at 0;
    an engine that serves the base (100% of the effect) fails however deep the stack."""
    base, tok = load_model(str(tiny_dir), "cpu", "float32")
    model = add_lora(base, Lora(r=4, alpha=8))
    seqs = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    rep = check_logprobs(OffByShare(model, tok.pad_token_id, 0.03), model, seqs, tok.pad_token_id, 1e-4, 0, 0.05)
    assert rep["mean_abs_diff"] == pytest.approx(0.03 * rep["lora_effect"], rel=1e-3)
    assert rep["allowed"] == pytest.approx(1e-4 + 0.05 * rep["lora_effect"])
    with pytest.raises(ModelError, match=r"allowed 0\.000"):
        check_logprobs(OffByShare(model, tok.pad_token_id, 0.03), model, seqs, tok.pad_token_id, 1e-4, 0, 0.0)
    with pytest.raises(ModelError, match="x the adapter's effect"):
        check_logprobs(OffByShare(model, tok.pad_token_id, 1.0), model, seqs, tok.pad_token_id, 1e-4, 0, 0.5)
    assert all(float(p.abs().max()) == 0 for n, p in model.named_parameters() if "lora_B" in n)  # restored
