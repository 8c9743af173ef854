"""`sleepctl export`: the current stack as one PEFT adapter, or merged into a standalone model folder.

A stack is never merged in the home; an export is how it leaves. Stacked LoRA deltas add, so the whole
lineage is one adapter of the summed rank with each adapter's scale (alpha/r, or alpha/sqrt(r) for rsLoRA)
folded into its B factor (`adapters.concat_loras`); its config then says `lora_alpha == r`, scale 1. That
adapter on the plain base computes what `attach_stack` computes, and merging it into the base weights gives
the merged folder. Either is written under a temporary name beside DIR and renamed into place: an export
that fails leaves nothing at DIR.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel

from . import __version__
from .adapters import lineage, stack_lora, write_lora
from .errors import SleepError, UsageError
from .home import Home, open_home, private_umask
from .models import resolve, upstream_id
from .records import Adapter
from .store import Store, now

DTYPES = ("auto", "float32", "bfloat16", "float16")


class ExportResult(BaseModel):
    kind: Literal["adapter", "merged"]
    path: str
    adapter_id: str
    adapter_version: int
    lineage: list[str]  # adapter ids, oldest first: what the export holds
    base_model: str  # as the adapters record it (an alias, a folder, a GGUF, a hub id)
    base_model_id: str  # what the export names as its base (adapter_config.json)
    base_model_path: str  # the local folder the stack was trained on
    rank: int | None = None  # adapter: the summed rank
    dtype: str
    message: str


@contextmanager
def _open_stack(home: str | os.PathLike | None, adapter_id: str | None) -> Iterator[tuple[Home, Store, list[Adapter]]]:
    """The lineage to export (the current adapter's, or `adapter_id`'s), with the home's store open read-only."""
    from .evaluate import resolve_target

    h = open_home(home)
    st = Store(h.db_path, readonly=True)
    try:
        if adapter_id in ("base", "none"):
            raise UsageError("the base model has no adapter to export", hint="give an adapter: --adapter-id v2")
        a = resolve_target(st, adapter_id)
        if a is None:
            raise SleepError(
                "no adapter to export: the home has no current adapter",
                hint="consolidate memories first (sleepctl seed), or pick one with --adapter-id (sleepctl adapters list)",
            )
        yield h, st, lineage(st, a.id)
    finally:
        st.close()


def _metadata(h: Home, st: Store, stack: list[Adapter], kind: str, base_id: str, base_path: Path) -> dict:
    from .evaluate import run_recipe

    a = stack[-1]
    try:
        recipe = run_recipe(a, st)
    except SleepError:
        recipe = None
    return {
        "sleepctl_version": __version__,
        "kind": kind,
        "exported_at": now(),
        "home": str(h.root),
        "adapter_id": a.id,
        "adapter_version": a.version,
        "lineage": [{"id": x.id, "version": x.version, "kind": x.kind, "run_id": x.run_id} for x in stack],
        "base_model": a.base_model,
        "base_model_id": base_id,
        "base_model_path": str(base_path),
        # the stack learnt its memories under this system prompt; a chat without one asks a different question
        "system_prompt": recipe.data.system_prompt if recipe else None,
    }


def _check_dest(dest: str | os.PathLike, force: bool, protected: list[Path]) -> Path:
    p = Path(dest).expanduser().absolute()
    for q in protected:
        q = q.absolute()
        if p == q or p in q.parents:
            raise UsageError(f"{p} holds {q}: an export may not replace it", hint="export to a new folder")
    if p.is_symlink():
        raise UsageError(f"{p} is a symbolic link", hint="give a real folder, or remove the link")
    if p.exists():
        if not p.is_dir():
            raise UsageError(f"{p} exists and is not a folder", hint="choose another DIR")
        if any(p.iterdir()):
            if not force:
                raise UsageError(f"{p} exists and is not empty", hint="choose a new DIR, or --force to replace it")
            if not any((p / f).exists() for f in ("sleepctl.json", "adapter_config.json", "config.json")):
                # --force replaces an earlier export, never a folder of other things (`--force ~` by a slip)
                raise UsageError(
                    f"{p} is not an earlier model export; --force replaces only those", hint="choose a new DIR"
                )
    return p


@contextmanager
def _staged(dest: Path) -> Iterator[Path]:
    """A private temporary folder beside `dest`, renamed to `dest` when the block succeeds, removed if not."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.tmp-"))
    except OSError as e:
        raise SleepError(f"cannot write into {dest.parent}: {e.strerror or e}", hint="choose a writable DIR") from e
    try:
        with private_umask():  # the weights hold the agent's memories, as the home does
            yield tmp
        if dest.exists() and any(dest.iterdir()):
            old = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.old-"))
            os.replace(dest, old / "x")
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)  # onto an empty folder too
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise SleepError(
            f"could not write the export: {e.strerror or e}", hint=f"free disk space; nothing was left at {dest}"
        ) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _base(stack: list[Adapter], base_name: str | None) -> tuple[str, Path]:
    """(the name the export gives its base, the local folder the stack was trained on)."""
    name = stack[-1].base_model
    path = resolve(name).path.absolute()
    return base_name or upstream_id(name) or str(path), path


def _dtype(dtype: str, default: torch.dtype) -> torch.dtype:
    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}: use {', '.join(DTYPES)}")
    return default if dtype == "auto" else getattr(torch, dtype)


def export_adapter(
    dest: str | os.PathLike,
    *,
    home: str | os.PathLike | None = None,
    adapter_id: str | None = None,
    force: bool = False,
    dtype: str = "auto",
    base_name: str | None = None,
) -> ExportResult:
    """One PEFT adapter equal to the stack on the plain base (fp32 by default: exact)."""
    out_dtype = _dtype(dtype, torch.float32)
    with _open_stack(home, adapter_id) as (h, st, stack):
        base_id, base_path = _base(stack, base_name)
        p = _check_dest(dest, force, [h.root, base_path, *(Path(a.path) for a in stack)])
        lora = stack_lora(stack)
        if lora is None:
            raise SleepError(f"adapter v{stack[-1].version} and its ancestors hold no LoRA weights")
        meta = _metadata(h, st, stack, "adapter", base_id, base_path)
        with _staged(p) as tmp:
            write_lora(lora, tmp, base_model=base_id, dtype=out_dtype)
            (tmp / "sleepctl.json").write_text(json.dumps(meta, indent=2))
            (tmp / "README.md").write_text(_card(meta, lora[1]["r"]))
    a = stack[-1]
    return _result(
        "adapter",
        p,
        stack,
        base_id,
        base_path,
        out_dtype,
        f"exported adapter v{a.version} ({len(stack)} stacked, rank {lora[1]['r']}) to {p}",
        rank=lora[1]["r"],
    )


def export_merged(
    dest: str | os.PathLike,
    *,
    home: str | os.PathLike | None = None,
    adapter_id: str | None = None,
    force: bool = False,
    dtype: str = "auto",
) -> ExportResult:
    """A standalone Hugging Face model folder: the base weights with the stack merged in, tokenizer and chat
    template, generation config. Merged in fp32, saved in the base's dtype unless `dtype` says otherwise."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    with _open_stack(home, adapter_id) as (h, st, stack):
        base_id, base_path = _base(stack, None)
        p = _check_dest(dest, force, [h.root, base_path, *(Path(a.path) for a in stack)])
        cfg = AutoConfig.from_pretrained(base_path)
        stored = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None) or torch.float32
        out_dtype = _dtype(dtype, getattr(torch, stored) if isinstance(stored, str) else stored)
        lora = stack_lora(stack)
        meta = _metadata(h, st, stack, "merged", base_id, base_path)
        model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
        if lora is not None:
            model = merge_lora(model, lora)
        model.to(out_dtype)
        tok = AutoTokenizer.from_pretrained(base_path)
        with _staged(p) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
            (tmp / "sleepctl.json").write_text(json.dumps(meta, indent=2))
    a = stack[-1]
    msg = f"exported {a.base_model} with adapter v{a.version} ({len(stack)} stacked) merged in to {p}"
    return _result("merged", p, stack, base_id, base_path, out_dtype, msg)


def _result(kind: str, p: Path, stack: list[Adapter], base_id: str, base_path: Path, dtype, message: str, **extra):
    """What both exports report: the lineage they hold and the base it applies to."""
    a = stack[-1]
    return ExportResult(
        kind=kind,
        path=str(p),
        adapter_id=a.id,
        adapter_version=a.version,
        lineage=[x.id for x in stack],
        base_model=a.base_model,
        base_model_id=base_id,
        base_model_path=str(base_path),
        dtype=str(dtype).removeprefix("torch."),
        message=message,
        **extra,
    )


def merge_lora(model, lora):
    """The base model with this LoRA added into its weights (in the model's dtype), as a plain model."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    tensors, cfg = lora
    pm = get_peft_model(
        model,
        LoraConfig(
            r=cfg["r"], lora_alpha=cfg["lora_alpha"], target_modules=cfg["target_modules"], task_type="CAUSAL_LM"
        ),
        adapter_name="export",
    )
    res = set_peft_model_state_dict(pm, tensors, adapter_name="export")
    if getattr(res, "unexpected_keys", None):
        raise SleepError(f"the adapter stack does not fit its base model: {res.unexpected_keys[:3]}")
    return pm.merge_and_unload()


def _card(meta: dict, rank: int) -> str:
    versions = ", ".join(f"v{x['version']}" for x in meta["lineage"])
    return f"""# sleepctl adapter v{meta["adapter_version"]}

A LoRA adapter (rank {rank}) holding the memories that sleepctl consolidated into the stack {versions}:
one adapter equal to the stack, its scales folded in (`lora_alpha` = `r`).

Base model: `{meta["base_model_id"]}`. It was trained on the local weights at `{meta["base_model_path"]}`
(sleepctl's `{meta["base_model"]}`); where those are a dequantised GGUF, the upstream weights are close to
them but not equal, and loading the adapter on the local folder reproduces the stack exactly:

```python
from transformers import AutoModelForCausalLM
from peft import PeftModel
base = AutoModelForCausalLM.from_pretrained("{meta["base_model_path"]}")
model = PeftModel.from_pretrained(base, "<this folder>")
```

System prompt it was trained under: {json.dumps(meta["system_prompt"])}
"""
