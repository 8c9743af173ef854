"""Integration with the real SmolLM2-135M (a model that knows language), through the offline alias."""

from __future__ import annotations

import json

import pytest

from sleepctl import record
from sleepctl.evaluate import evaluate
from sleepctl.models import OFFLINE_MODELS, resolve
from sleepctl.seed import seed

from .conftest import cli

pytestmark = pytest.mark.slow


def test_alias_resolves_to_checked_bf16_cache():
    r = resolve("smollm2-135m")
    src = json.loads((r.path / "sleepctl-source.json").read_text())
    assert src["sha256"] == OFFLINE_MODELS["smollm2-135m"].sha256
    assert list(r.path.glob("*.safetensors"))
    cfg = json.loads((r.path / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16" and "quantization_config" not in cfg


def test_in_context_beats_closed_book_and_judge_runs(home, small_memories):
    record([small_memories], home=home)
    r = evaluate(home=home, overrides={"eval.ppl_paragraphs": 4})
    by = {m.method: m for m in r.methods}
    assert by["in-context"].contains > by["base"].contains  # it reads its context; it cannot know the facts
    assert by["in-context"].judge is not None and by["in-context"].judge >= by["in-context"].contains
    assert 3 < r.perplexity["base"] < 60


def test_quick_recipe_seed_runs_on_the_real_model(home, small_memories):
    record([small_memories], home=home)
    res = seed(
        home=home,
        show_progress=False,
        overrides={
            "training.max_steps": 3,
            "training.batch_size": 4,
            "data.questions_per_memory": 2,
            "data.entity_prompts": 1,
            "data.probes_per_memory": 1,
            "data.teacher_samples": 1,
            "data.max_new_tokens": 24,
            "loss.num_generations": 2,
        },
    )
    assert res.status == "done" and res.final["train/tokens"] > 0
    out = cli("adapters", "list", "--home", str(home), "--json")
    ads = json.loads(out.stdout)
    assert len(ads) == 1 and ads[0]["current"] and ads[0]["base_model"] == "smollm2-135m"
