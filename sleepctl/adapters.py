"""The adapter registry and the stack: lineage, publish, rollback, prune, and a stack served as one LoRA.

A stack (an adapter and its ancestors) is never merged into the base weights. LoRA deltas add, and a
sum of low-rank products is one low-rank product of concatenated factors:

    sum_i s_i * B_i @ A_i  =  [s_1 B_1 | s_2 B_2 | ...] @ [A_1; A_2; ...]

so the whole stack is one frozen adapter of the summed rank. The trainer attaches it as the frozen
adapter "stack" beside the trainable "default"; vLLM serves the same concatenation (with the trainable
adapter appended) as one LoRARequest on the plain base; and the base itself is always one
`disable_adapter()` away, which the anchor to the base and the base row of `eval` need.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch

from .errors import SleepError
from .home import Home
from .records import Adapter
from .store import Store, new_id, now

STACK = "stack"  # name of the frozen adapter that holds every earlier adapter
NEW = "default"  # name of the adapter being trained

LoraState = tuple[
    dict[str, torch.Tensor], dict
]  # PEFT tensors without adapter names, and {r, lora_alpha, target_modules}


# --- lineage ----------------------------------------------------------------------------------------


def lineage(st: Store, adapter_id: str | None) -> list[Adapter]:
    """The adapter and its ancestors, oldest first: the stack to apply on the base model."""
    chain: list[Adapter] = []
    seen = set()
    while adapter_id:
        if adapter_id in seen:
            raise SleepError(f"adapter lineage loops at {adapter_id}")
        seen.add(adapter_id)
        a = st.adapter(adapter_id)
        chain.append(a)
        adapter_id = a.parent_id
    return list(reversed(chain))


# --- the stack as one LoRA ----------------------------------------------------------------------------------


def read_lora(path: str | Path) -> LoraState:
    """A saved PEFT LoRA adapter: its tensors and the config fields that fix its scale."""
    from safetensors.torch import load_file

    p = Path(path)
    if not (p / "adapter_model.safetensors").exists():
        raise SleepError(f"adapter at {p} is missing its weights (adapter_model.safetensors)")
    cfg = json.loads((p / "adapter_config.json").read_text())
    if cfg.get("use_dora"):
        raise SleepError(
            f"adapter at {p} is a DoRA adapter; stacks of DoRA adapters do not add up and are not supported"
        )
    return load_file(p / "adapter_model.safetensors"), cfg


def lora_scale(cfg: dict) -> float:
    r = cfg["r"]
    return cfg["lora_alpha"] / (r**0.5 if cfg.get("use_rslora") else r)


def concat_loras(parts: list[LoraState]) -> LoraState | None:
    """Several LoRA adapters on one base as one adapter of the summed rank, exactly (scales folded into B).

    A module that some adapter does not touch gets zero rows there, so every module has the same rank.
    """
    parts = [p for p in parts if p[0]]
    if not parts:
        return None
    modules: dict[str, tuple[int, int]] = {}  # module key prefix -> (in_features, out_features)
    for state, _ in parts:
        for k, v in state.items():
            if k.endswith(".lora_A.weight"):
                pre = k[: -len(".lora_A.weight")]
                modules[pre] = (v.shape[1], state[pre + ".lora_B.weight"].shape[0])
    out: dict[str, torch.Tensor] = {}
    for pre, (fan_in, fan_out) in sorted(modules.items()):
        a_rows, b_cols = [], []
        for state, cfg in parts:
            r = cfg["r"]
            a = state.get(pre + ".lora_A.weight")
            b = state.get(pre + ".lora_B.weight")
            if a is None:
                a, b = torch.zeros(r, fan_in), torch.zeros(fan_out, r)
            a_rows.append(a.detach().float().cpu())
            b_cols.append(b.detach().float().cpu() * lora_scale(cfg))
        out[pre + ".lora_A.weight"] = torch.cat(a_rows, 0)
        out[pre + ".lora_B.weight"] = torch.cat(b_cols, 1)
    rank = sum(cfg["r"] for _, cfg in parts)
    targets = sorted({t for _, cfg in parts for t in _targets(cfg)})
    return out, {"r": rank, "lora_alpha": rank, "target_modules": targets}


@torch.no_grad()
def init_from_stack(model, state: LoraState, adapter: str) -> float:
    """Start `adapter` at the best approximation of the stack its rank allows; returns the share kept.

    Per module the stack's delta B @ A (rank R, scales folded) is cut to its top singular directions, through
    QR of each factor so no full weight-sized matrix is formed: B = Qb Rb, A^T = Qa Ra, Rb Ra^T = U S V^T, and
    the top k give B' = Qb U_k sqrt(S_k / s), A' = sqrt(S_k / s) V_k^T Qa^T with s the adapter's scale. Ranks
    the stack does not fill keep their fresh LoRA init (A random, B zero) and can still learn. The share kept
    is the squared Frobenius norm of the cut delta over the stack's, over all modules: 1.0 when nothing is lost.
    """
    tensors, _ = state
    kept = total = 0.0
    for name, mod in model.named_modules():
        la, lb = getattr(mod, "lora_A", None), getattr(mod, "lora_B", None)
        if not isinstance(la, torch.nn.ModuleDict) or adapter not in la:
            continue
        a = tensors.get(name + ".lora_A.weight")
        if a is None:
            continue
        b = tensors[name + ".lora_B.weight"]
        wa, wb = la[adapter].weight, lb[adapter].weight
        s = mod.scaling[adapter]
        qb, rb = torch.linalg.qr(b.double())
        qa, ra = torch.linalg.qr(a.double().T)
        u, sv, vh = torch.linalg.svd(rb @ ra.T)
        k = min(wa.shape[0], sv.numel())
        root = (sv[:k] / s).sqrt()
        wb[:, :k] = (qb @ u[:, :k] * root).to(wb)
        wa[:k] = (root[:, None] * (vh[:k] @ qa.T)).to(wa)
        wb[:, k:] = 0
        kept += float((sv[:k] ** 2).sum())
        total += float((sv**2).sum())
    return kept / total if total > 0 else 1.0


def _targets(cfg: dict) -> list[str]:
    t = cfg.get("target_modules") or []
    return [t] if isinstance(t, str) else list(t)


def stack_lora(stack: list[Adapter]) -> LoraState | None:
    """The frozen stack as one adapter; None for an empty stack."""
    for a in stack:
        if not Path(a.path).exists():
            raise SleepError(f"adapter v{a.version} is missing its files at {a.path}")
    return concat_loras([read_lora(a.path) for a in stack])


def write_lora(state: LoraState, path: Path, base_model: str | None = None, dtype=torch.bfloat16) -> None:
    """A PEFT-format adapter folder (what vLLM's LoRARequest and PeftModel.from_pretrained read)."""
    from safetensors.torch import save_file

    tensors, cfg = state
    path.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.detach().to(dtype).contiguous().cpu() for k, v in tensors.items()}, path / "adapter_model.safetensors"
    )
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": cfg["r"],
        "lora_alpha": cfg["lora_alpha"],
        "target_modules": cfg["target_modules"],
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "base_model_name_or_path": base_model,
    }
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2))


def attach_stack(model, stack: list[Adapter]):
    """The base with the stack as one frozen adapter; the base weights are never changed."""
    if not stack:
        return model
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    tensors, cfg = stack_lora(stack)
    pm = get_peft_model(
        model,
        LoraConfig(
            r=cfg["r"], lora_alpha=cfg["lora_alpha"], target_modules=cfg["target_modules"], task_type="CAUSAL_LM"
        ),
        adapter_name=STACK,
    )
    missing = set_peft_model_state_dict(pm, tensors, adapter_name=STACK)
    if getattr(missing, "unexpected_keys", None):
        raise SleepError(f"the adapter stack does not fit this model: {missing.unexpected_keys[:3]}")
    pm.requires_grad_(False)
    _freeze_for_good(pm)
    pm.eval()
    return pm


def _freeze_for_good(pm) -> None:
    """The stack's weights become buffers: PEFT marks active adapters trainable again whenever it re-enables
    adapter layers (after every `disable_adapter()`), and a parameter would then be trained and checkpointed."""
    for mod in pm.modules():
        for name in ("lora_A", "lora_B"):
            layers = getattr(mod, name, None)
            if isinstance(layers, torch.nn.ModuleDict) and STACK in layers:
                lin = layers[STACK]
                w = lin.weight.detach()
                del lin.weight
                lin.register_buffer("weight", w)


@contextmanager
def active(model, names: list[str]):
    """Run with only these adapters active (e.g. the stack without the new adapter); what trains is unchanged."""
    prev = list(model.base_model.active_adapters)
    # read before set_adapter, which marks the adapters it activates trainable and the others frozen
    trainable = {n: p.requires_grad for n, p in model.named_parameters()}
    model.base_model.set_adapter(names)
    try:
        yield model
    finally:
        model.base_model.set_adapter(prev)
        for n, p in model.named_parameters():
            p.requires_grad_(trainable[n])


# --- publish, rollback, prune -----------------------------------------------------------------------------


def publish_adapter(
    home: Home,
    st: Store,
    peft_model,
    *,
    run_id: str,
    kind: str,
    base_model: str,
    parent_id: str | None,
    trace_ids: list[str],
    metrics: dict,
    make_current: bool = True,
    mark_consolidated: bool = True,
    replaces: str | None = None,
    expect_current: str | None | bool = False,
) -> Adapter:
    """Write the trained adapter under a temporary name, move it into place, then commit the registry row.

    `expect_current`: the current adapter the run was started on; if another job moved it meanwhile, the
    adapter is kept but not made current (its training assumed a stack that is no longer current).
    """
    for stale in home.adapters_dir.glob(".tmp-*"):  # left by a crash mid-write; never registered
        shutil.rmtree(stale, ignore_errors=True)
    version = st.next_adapter_version()
    adapter_id = new_id("a")
    final = home.adapters_dir / f"v{version:03d}-{adapter_id}"
    tmp = home.adapters_dir / f".tmp-{adapter_id}"
    try:
        peft_model.save_pretrained(tmp, safe_serialization=True, selected_adapters=[NEW])
        (tmp / "sleepctl.json").write_text(
            json.dumps(
                {
                    "id": adapter_id,
                    "version": version,
                    "run_id": run_id,
                    "kind": kind,
                    "base_model": base_model,
                    "parent_id": parent_id,
                    "replaces": replaces,
                },
                indent=2,
            )
        )
        os.replace(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise SleepError(
            f"could not write the adapter: {e.strerror or e}",
            hint="free disk space in the home; the current adapter is unchanged",
        ) from e
    a = Adapter(
        id=adapter_id,
        version=version,
        run_id=run_id,
        kind=kind,
        base_model=base_model,
        parent_id=parent_id,
        path=str(final),
        trace_ids=trace_ids,
        metrics=metrics,
        created_at=now(),
        current=make_current,
        replaces=replaces,
    )
    with st.transaction() as db:
        if expect_current is not False and st.current_adapter_id() != expect_current:
            make_current = False
            a.current = False
            a.metrics = {**metrics, "not_current_because": "the current adapter changed while this run trained"}
        st.insert_adapter(db, a)
        if make_current:
            st.set_current(db, adapter_id)
            if mark_consolidated:
                st.mark_consolidated(db, trace_ids, adapter_id)
    return a


def rollback(st: Store, ref: str | None = None) -> Adapter | None:
    """Make an earlier adapter current (default: what the current one was built on); None means base only.

    A consolidation sits on the plain base but replaced a stack: rolling it back returns to that stack.
    """
    cur = st.current_adapter_id()
    if ref is None:
        if cur is None:
            raise SleepError("no current adapter to roll back from")
        a = st.adapter(cur)
        target = a.replaces if a.kind == "consolidate" else a.parent_id
    elif ref in ("base", "none"):
        target = None
    else:
        target = st.adapter(ref).id
    set_current(st, target)
    return st.adapter(target) if target else None


def set_current(st: Store, target: str | None) -> None:
    stack = lineage(st, target)
    with st.transaction() as db:
        st.set_current(db, target)
        # A memory is consolidated only while an adapter that holds it is in the current stack:
        # rolled-back memories become pending again, so the next seed learns them anew.
        keep = {a.id for a in stack}
        for row in db.execute("SELECT DISTINCT adapter_id FROM traces WHERE adapter_id IS NOT NULL").fetchall():
            if row[0] not in keep:
                st.mark_pending(db, row[0])
        for a in stack:
            if a.kind != "dream":  # a dream rehearses memories that a seed adapter holds
                st.mark_consolidated(db, a.trace_ids, a.id)


def prunable(st: Store) -> list[Adapter]:
    """Adapters outside the current lineage: replaced by a consolidation, rolled back, or dreams not kept."""
    keep = {a.id for a in lineage(st, st.current_adapter_id())}
    return [a for a in st.adapters() if a.id not in keep]


def prune(st: Store, ids: list[str]) -> list[Adapter]:
    """Delete these adapters' folders and registry rows; the current lineage is refused, whatever is asked."""
    keep = {a.id for a in lineage(st, st.current_adapter_id())}
    targets = [st.adapter(i) for i in ids]
    bad = [a for a in targets if a.id in keep]
    if bad:
        raise SleepError(f"adapter v{bad[0].version} is in the current lineage and cannot be pruned")
    with st.transaction() as db:
        for a in targets:
            st.delete_adapter(db, a.id)
    for a in targets:  # the rows went first: a crash here leaves a folder no row points to, never the reverse
        shutil.rmtree(a.path, ignore_errors=True)
    return targets
