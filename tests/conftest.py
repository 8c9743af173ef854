"""Shared fixtures: tiny random-weight models with the real SmolLM2 tokenizer, and homes to play in."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "memories.jsonl"


def tiny_model(path: Path, seed: int = 0, extra_tokens: list[str] | None = None, layers: int = 2) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from sleepctl.models import load_tokenizer

    tok = load_tokenizer("smollm2-135m")  # real tokenizer; weights below are random
    if extra_tokens:
        tok.add_tokens(extra_tokens)
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
        initializer_range=0.5,
    )  # wide init: varied greedy text
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_other_tok_dir(tmp_path_factory) -> Path:
    return tiny_model(tmp_path_factory.mktemp("tiny2") / "model", seed=1, extra_tokens=["<memo>", "<recall>"])


def write_recipe(path: Path, model: str, teacher: str = "self", **sections) -> Path:
    """A recipe small enough for a unit test: a few steps of a tiny model."""
    r = {
        "profiles": {"small": {"model": str(model)}, "large": {"model": str(model)}},
        "teacher": teacher,
        "student": "large",
        "lora": {"r": 4, "alpha": 8},
        "data": {
            "questions_per_memory": 2,
            "entity_prompts": 1,
            "probes_per_memory": 1,
            "teacher_samples": 1,
            "max_new_tokens": 6,
            "grounded_only": False,  # random weights ground nothing
        },
        "loss": {"alpha": 0.8, "num_generations": 2, "lmbda": 0.5, "lmbda_warmup_steps": 2, "gamma": 0.0},
        "training": {"max_steps": 4, "batch_size": 2, "checkpoint_every": 2, "device": "cpu"},
        "eval": {"max_new_tokens": 6, "ppl_paragraphs": 2, "judge": "none"},
    }
    for k, v in sections.items():
        r.setdefault(k, {}).update(v) if isinstance(v, dict) else r.__setitem__(k, v)
    path.write_text(yaml.safe_dump(r))
    return path


@pytest.fixture
def home(tmp_path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def small_memories(tmp_path) -> Path:
    """Three memories from the examples set, with their probes."""
    p = tmp_path / "three.jsonl"
    p.write_text("\n".join(EXAMPLES.read_text().splitlines()[:3]) + "\n")
    return p


def sigint_default() -> None:
    """preexec_fn for a child that a test stops with Ctrl-C: a shell that starts the suite in the background
    leaves SIGINT ignored, the child would inherit that, and Python then never raises KeyboardInterrupt."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def cli(
    *args: str, input: bytes | None = None, env: dict | None = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    """Run the real console entry point, as a user would, and capture its exit code."""
    e = dict(os.environ, **(env or {}))
    e.setdefault("COLUMNS", "200")
    return subprocess.run(
        [sys.executable, "-m", "sleepctl.cli", *args], input=input, capture_output=True, env=e, timeout=timeout
    )


def cli_json(*args: str, **kw):
    r = cli(*args, "--json", **kw)
    assert r.returncode == 0, r.stderr.decode()
    return json.loads(r.stdout)


def wait_for_lines(home: Path, pattern: str, lines: int, timeout: float = 300) -> Path | None:
    """Poll until a run file under home/runs matching `pattern` has `lines` lines; None on timeout."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        found = list((home / "runs").glob(pattern)) if (home / "runs").exists() else []
        if found and len(found[0].read_text().splitlines()) >= lines:
            return found[0]
        time.sleep(0.2)
    return None


@pytest.fixture
def dynamo_clean():
    """A test that compiles leaves no graphs and no raised recompile limit to the tests after it."""
    import torch._dynamo

    limit = torch._dynamo.config.recompile_limit
    yield
    torch._dynamo.reset()
    torch._dynamo.config.recompile_limit = limit


def randomize_lora_b(model, std: float) -> None:
    """A trained-looking adapter: a fresh one (B = 0) changes nothing, so A gets no gradient and every KL is 0."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, std)
