"""A wheel built from this tree, installed in fresh venvs: recipes inside the package, `record` without torch."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from .conftest import EXAMPLES, ROOT

pytestmark = pytest.mark.slow  # builds a wheel and two venvs (about a minute)


def sh(*args, cwd=None, check=True) -> subprocess.CompletedProcess:
    r = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=600)
    if check and r.returncode != 0:
        raise AssertionError(f"{args} -> {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    sh(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", out, ROOT)
    (w,) = out.glob("sleepctl-*.whl")
    return w


def test_record_only_install_needs_no_torch(wheel, tmp_path):
    """`pip install sleepctl` on an agent host: records, lists, knows its recipes; training says what to add."""
    venv = tmp_path / "venv"
    sh(sys.executable, "-m", "venv", venv)
    sh(venv / "bin" / "python", "-m", "pip", "install", "-q", wheel)
    py, cli = venv / "bin" / "python", venv / "bin" / "sleepctl"
    for mod in ("torch", "transformers", "peft", "matplotlib"):
        assert sh(py, "-c", f"import {mod}", check=False).returncode != 0, f"{mod} came with the core install"

    names = sh(cli, "recipes", "list", cwd=tmp_path).stdout
    assert all(n in names for n in ("quick-cpu", "qwen-cpu", "qwen-small-large"))
    home = tmp_path / "home"
    sh(cli, "record", EXAMPLES, "--home", home, cwd=tmp_path)
    sh(cli, "record", "--text", "The offsite moved to Lisbon.", "--home", home, cwd=tmp_path)
    assert "Lisbon" in sh(cli, "list", "--home", home, "--json").stdout

    r = sh(cli, "seed", "--home", home, check=False, cwd=tmp_path)
    assert r.returncode == 1
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "sleepctl[train]" in lines[0], r.stderr


def test_wheel_install_seeds_with_a_bundled_recipe(wheel, tmp_path, tiny_dir):
    """The wheel's own recipes, from a folder that is not the repo: `seed --recipe quick-cpu` runs."""
    venv = tmp_path / "venv"
    sh(sys.executable, "-m", "venv", venv)
    site = Path(
        sh(venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))").stdout.strip()
    )
    (site / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")  # torch & co from this venv, not sleepctl
    sh(venv / "bin" / "python", "-m", "pip", "install", "-q", "--no-deps", wheel)
    where = sh(venv / "bin" / "python", "-c", "import sleepctl.recipe as r; print(r.RECIPES_DIR)", cwd=tmp_path).stdout
    assert str(ROOT) not in where and "site-packages" in where

    home, cli = tmp_path / "home", venv / "bin" / "sleepctl"
    mem = tmp_path / "one.jsonl"
    mem.write_text(EXAMPLES.read_text().splitlines()[0] + "\n")
    sh(cli, "record", mem, "--home", home, cwd=tmp_path)
    tiny = [f"profiles.{p}.model={tiny_dir}" for p in ("small", "large")]
    small = ["training.max_steps=2", "training.batch_size=2", "training.device=cpu", "data.questions_per_memory=1",
             "data.entity_prompts=0", "data.restatements=1", "data.max_new_tokens=4", "data.grounded_only=false",
             "loss.num_generations=2", "anchor.kl_coef=0", "replay.fraction=0"]  # fmt: skip
    sets = [a for kv in tiny + small for a in ("--set", kv)]
    sh(cli, "seed", "--recipe", "quick-cpu", *sets, "--home", home, cwd=tmp_path)
    adapters = json.loads(sh(cli, "adapters", "list", "--home", home, "--json").stdout)
    assert len(adapters) == 1 and adapters[0]["current"], adapters
