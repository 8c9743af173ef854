"""Consolidation, the paper's multi-level memory: every memory the stack holds, distilled into one fresh adapter.

    sleepctl consolidate                 # now
    sleepctl consolidate --if-needed     # only when the stack holds more than consolidate.max_adapters (cron)

Night after night the stack grows by an adapter, and so do serving cost and drift. Consolidation trains
one new adapter on the plain base, started at the stack cut to its rank (`adapters.init_from_stack`: from a
fresh LoRA, 150 steps lost a night's recall on the H100 and the gate refused it), with the seed objective
(objectives.py) through the one loop (loop.py):
the teacher sees each memory with its related ones in time order (newer facts win), the student learns
all of them at once, from the teacher data the home already holds (generated only for memories that have
none). Optionally the current stack is an extra teacher (`consolidate.stack_kl_coef`): it already says
things the way the student does. The adapter is published like any other; it becomes current only if
held-out recall of every earlier night and general perplexity did not get worse than under the stack it
replaces (within `recall_tolerance` and `ppl_tolerance`). The old adapters stay for `adapters rollback`;
`sleepctl adapters prune` removes them.
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
import time
from typing import Any

import torch
from pydantic import BaseModel
from rich.console import Console

from . import distributed
from .adapters import NEW, STACK, active, init_from_stack, lineage, publish_adapter, stack_lora
from .anchor import AnchorText, kl_drift
from .data import Example, build_data, context, link
from .engines import lora_capacity, release_engines
from .evaluate import answer, inference_engine, job_recipe, perplexity
from .general_text import reference_paragraphs
from .home import Home, open_home, sleep_lock
from .loop import train
from .models import load_model
from .objectives import SeedObjective
from .recipe import Lora, Recipe
from .records import Adapter, Probe, Trace
from .replay import NightBatches, cached_examples, without_stale
from .runs import (
    find_resumable,
    latest_checkpoint,
    load_checkpoint,
    run_status,
    seed_everything,
    start_run,
    sweep,
)
from .scoring import SCORING_VERSION, recalled
from .seed import check_stack, engines_for, load_teacher, vllm_check
from .store import Store
from .training import add_lora, make_optimizer, peak_memory_mb

err = Console(stderr=True, soft_wrap=True)

EXIT_NOT_CURRENT = 3


class ConsolidateResult(BaseModel):
    status: str  # done | not-current | nothing
    message: str
    exit_code: int = 0
    run_id: str | None = None
    adapter_id: str | None = None
    adapter_version: int | None = None
    made_current: bool = False
    replaced: list[int] = []  # versions of the stack it replaces
    memories: int = 0
    steps: int = 0
    init_kept: float | None = None  # share of the stack the new adapter started from (None: a fresh LoRA)
    phases_s: dict[str, float] = {}  # load and init, engines, data, the gate before, check, train, the gate after
    before: dict[str, Any] = {}
    after: dict[str, Any] = {}
    worse: list[str] = []
    wall_s: float = 0.0


def consolidate(
    recipe: str | None = None,
    *,
    home: str | os.PathLike | None = None,
    if_needed: bool = False,
    overrides: dict | None = None,
    show_progress: bool = True,
    keep_engines: bool = False,
) -> ConsolidateResult:
    """Distil the current stack's memories into one adapter. Without `recipe`, the recipe of the run that made
    the current adapter (a GPU home stays on its GPU recipe)."""
    distributed.refuse("consolidate")  # one process: only seed trains across several
    t0 = time.time()
    h = open_home(home)
    try:
        with sleep_lock(h, "consolidate"):
            st = Store(h.db_path)
            try:
                sweep(h, st)  # what a job that died left behind
                cfg = job_recipe(st, recipe, overrides)
                res = consolidate_locked(cfg, h, st, if_needed=if_needed, show_progress=show_progress)
            finally:
                st.close()
    finally:
        if not keep_engines:
            release_engines()
    res.wall_s = time.time() - t0
    return res


def consolidate_locked(
    cfg: Recipe, h: Home, st: Store, *, if_needed: bool, show_progress: bool, retrain: bool = False
) -> ConsolidateResult:
    """The work, for a caller that already holds the home's lock (dream's automatic consolidation).

    `retrain` (`forget --retrain`): the stack holds forgotten memories. Even a one-adapter stack is
    consolidated, the old stack is never a teacher (it knows what is forgotten), and the result is made
    current whatever the gate finds (what got worse is still reported).
    """
    t0 = time.time()
    if retrain:
        cfg = cfg.model_copy(deep=True)
        cfg.consolidate.stack_kl_coef = 0.0
    current = st.current_adapter_id()
    if current is None:
        return ConsolidateResult(status="nothing", message="nothing to consolidate: no adapter yet")
    stack = lineage(st, current)
    limit = cfg.consolidate.max_adapters
    if len(stack) <= 1 and not retrain:
        return ConsolidateResult(status="nothing", message="nothing to consolidate: the current stack is one adapter")
    if if_needed and len(stack) <= limit:
        return ConsolidateResult(
            status="nothing",
            message=f"no consolidation needed: the stack holds {len(stack)} adapters (consolidate.max_adapters {limit})",
        )
    refused = _recent_refusal(st, stack, cfg.consolidate.retry_after) if if_needed else None
    if refused is not None:
        return ConsolidateResult(
            status="nothing",
            message=f"no consolidation tonight: v{refused.version}, made from this stack "
            f"{len(stack) - 1 - [a.id for a in stack].index(refused.replaces)} night(s) ago, was refused by its gate "
            f"({'; '.join(refused.metrics['worse'])}); the next try comes once the stack has grown by "
            f"consolidate.retry_after ({cfg.consolidate.retry_after}) adapters, or now with `sleepctl consolidate`",
        )
    student_name = stack[-1].base_model
    check_stack(stack, student_name)
    held = st.traces(status="consolidated")
    mem_ids = [t.id for t in held]
    resolved = cfg.model_dump()
    key = {"parent": current}
    rf = find_resumable(h, st, "consolidate", resolved, mem_ids, key) or start_run(
        h, st, "consolidate", resolved, mem_ids, key
    )
    err.print(f"[dim]consolidating {len(held)} memories of a {len(stack)}-adapter stack into one adapter…[/dim]")
    with run_status(st, rf):
        return _run(cfg, h, st, rf, stack, held, t0, show_progress, retrain)


def _run(
    cfg: Recipe, h: Home, st: Store, rf, stack: list[Adapter], held: list[Trace], t0: float, show: bool, retrain: bool
):
    tr, cc = cfg.training, cfg.consolidate
    current = stack[-1].id
    student_name = stack[-1].base_model
    by_id = {t.id: t for t in held}
    related = link(held, held, cfg.replay.max_related)
    touched = {o.id for n in held for o in related.get(n.id, []) if (o.created_at, o.id) < (n.created_at, n.id)}

    phases: dict[str, float] = {}  # where a consolidation's minutes go, saved with it
    mark = time.time()

    def lap(name: str) -> None:
        nonlocal mark
        phases[name] = phases.get(name, 0.0) + time.time() - mark
        mark = time.time()

    seed_everything(tr.seed)
    base, s_tok = load_model(student_name, tr.device, cfg.dtype(cfg.student))
    # a new adapter on the plain base; the stack rides along inactive, as the optional extra teacher
    model = add_lora(base, consolidated_lora(cfg), stack if cc.stack_kl_coef > 0 else None, fused=tr.fused_lora)
    if cc.stack_kl_coef > 0:
        model.base_model.set_adapter([NEW])
        for n, p in model.named_parameters():
            p.requires_grad_(f".{NEW}." in n)
    # it starts where the stack is (cut to its rank), so training only repairs the cut and re-balances the
    # nights; a stack that knows forgotten memories (`retrain`) is never a starting point
    init = "zero" if retrain else cc.init
    stack_state = functools.cache(lambda: stack_lora(stack))  # the stack's adapters read from disk once, if at all
    init_kept = init_from_stack(model, stack_state(), NEW) if init == "stack" else None
    if init_kept is not None:
        err.print(
            f"[dim]started from the stack cut to rank {model.peft_config[NEW].r}: {100 * init_kept:.1f}% of it kept[/dim]"
        )
    t_model, t_tok, _ = load_teacher(cfg, s_tok)
    teacher_model = t_model if t_model is not None else model
    lap("init")
    t_engine, s_engine = engines_for(cfg, h, model, s_tok, t_model, t_tok, lora_capacity(cfg, len(stack) - 1))
    s_engine.frozen = None
    lap("engines")

    # Teacher data: what the home holds; memories without any (an older home) get it written now.
    data_path = rf.path / "data.json"
    if data_path.exists():
        examples = {k: [Example(**e) for e in v] for k, v in json.loads(data_path.read_text()).items()}
    else:
        rows = st.examples([t.id for t in held])
        missing = [t for t in held if t.id not in rows]
        examples = without_stale(cached_examples(st, [by_id[i] for i in rows], cfg.data.restatements), by_id, touched)
        if missing:
            err.print(f"[dim]writing teacher data for {len(missing)} memories the home has none for…[/dim]")
            with torch.no_grad():
                t_engine.serve(None)
                ctx = model.disable_adapter() if t_model is None else _null()
                with ctx:
                    fresh, probes = build_data(
                        missing, cfg, t_engine, t_tok, st, random.Random(tr.seed), tr.seed, related
                    )
            with st.transaction() as db:
                st.insert_examples(db, rf.run.id, [(e.trace_id, e.prompt, e.samples) for e in fresh])
                for p in probes:
                    st.insert_probe(db, p)
            for e in fresh:
                examples.setdefault(e.trace_id, []).append(e)
        data_path.write_text(json.dumps({k: [e.__dict__ for e in v] for k, v in examples.items()}))
    lap("data")
    contexts = {t.id: context(t, related) for t in held}
    flat = [e for es in examples.values() for e in es]
    # every memory as likely as any other in a batch, whatever its number of examples
    batches = NightBatches([], examples, 1.0, tr.batch_size)
    steps = min(cc.max_steps, math.ceil(cc.steps_per_memory * len(held)))
    if init == "zero":  # a fresh adapter needs at least a night's budget
        steps = max(tr.max_steps, steps)
    anchor = AnchorText(s_tok, cfg) if cfg.anchor.kl_coef > 0 else None

    # the gate's reference: the stack this adapter replaces, measured before training (saved for a resume)
    heldout = [p for p in st.probes([t.id for t in held], split="heldout") if p.superseded_by is None]
    groups = _night_groups(stack, heldout)
    texts = reference_paragraphs(cfg.eval.ppl_paragraphs)
    before_path = rf.path / "before.json"
    before = json.loads(before_path.read_text()) if before_path.exists() else {}
    if before.get("scoring") != SCORING_VERSION:  # none yet, or scored by a rule an upgrade replaced
        ref, _ = load_model(student_name, tr.device, cfg.dtype(cfg.student))
        from .adapters import attach_stack

        ref = attach_stack(ref, stack)
        eng = inference_engine(cfg, ref, s_tok, lora_capacity(cfg, len(stack) - 1))
        if eng is not None:
            eng.serve(stack_state(), key=f"stack:{current}")
        before = _gate(ref, s_tok, groups, texts, cfg, eng)
        before["kl_drift"] = kl_drift(ref, s_tok, cfg)
        before["scoring"] = SCORING_VERSION
        before_path.write_text(json.dumps(before))
        del ref
    lap("gate_before")

    optim = cfg.optim if cc.lr is None else cfg.optim.model_copy(update={"lr": cc.lr})
    opt, sched = make_optimizer(model, optim, steps)
    start = 0
    ckpt = latest_checkpoint(rf)
    if ckpt is not None:
        start = load_checkpoint(ckpt, model, opt, sched).step
        err.print(f"[yellow]resuming consolidation {rf.run.id} from step {start}[/yellow]")
    engine_info: dict[str, Any] = {"engine": cfg.engine}
    if cfg.engine == "vllm":
        engine_info["logprob_check"] = vllm_check(s_engine, model, s_tok, flat, cfg)
    objective = SeedObjective(
        model,
        teacher_model,
        s_tok,
        t_tok,
        s_engine,
        cfg,
        contexts,
        batches,
        anchor,
        max_steps=steps,
        extra_teacher=(lambda: active(model, [STACK]), cc.stack_kl_coef) if cc.stack_kl_coef > 0 else None,
    )
    lap("check")
    loop = train(
        model,
        batches,
        objective,
        opt,
        sched,
        max_steps=steps,
        seed=tr.seed,
        grad_clip=cfg.optim.grad_clip,
        start=start,
        rf=rf,
        checkpoint_every=tr.checkpoint_every,
        label="consolidate",
        show_progress=show,
    )
    lap("train")
    if cfg.engine == "vllm":
        s_engine.frozen = None
        s_engine.sync(model, version=steps)
    eng = s_engine if cfg.engine == "vllm" else None
    with _only_new(model, cc.stack_kl_coef > 0):
        after = _gate(model, s_tok, groups, texts, cfg, eng)
        after["kl_drift"] = kl_drift(model, s_tok, cfg)
    worse = [
        f"{g} recall {100 * before['recall'][g]:.0f}% -> {100 * after['recall'][g]:.0f}%"
        for g in groups
        if after["recall"][g] is not None and after["recall"][g] < before["recall"][g] - cc.recall_tolerance
    ]
    if after["ppl"] > before["ppl"] * (1 + cc.ppl_tolerance):
        worse.append(f"general perplexity {before['ppl']:.2f} -> {after['ppl']:.2f}")
    lap("gate_after")
    metrics = {
        "steps": steps,
        "init": init,
        "init_kept": init_kept,
        "rank": model.peft_config[NEW].r,
        "memories": len(held),
        "examples": len(flat),
        "replaces": [a.version for a in stack],
        "before": before,
        "after": after,
        "worse": worse,
        "skipped_steps": loop.skipped,
        "kl_drift": after["kl_drift"],
        "engine": engine_info,
        "wall_s": time.time() - t0,
        "phases_s": phases,
        "peak_memory_mb": peak_memory_mb(next(model.parameters()).device),
    }
    a = publish_adapter(
        h,
        st,
        model,
        run_id=rf.run.id,
        kind="consolidate",
        base_model=student_name,
        parent_id=None,
        replaces=current,
        trace_ids=[t.id for t in held],
        metrics=metrics,
        make_current=not worse or retrain,
        expect_current=current,
    )
    st.update_run(
        rf.run.id, "done", {**metrics, "adapter_id": a.id, "adapter_version": a.version, "current": a.current}
    )
    (rf.path / "summary.json").write_text(json.dumps({**metrics, "adapter_id": a.id, "current": a.current}, indent=2))
    res = ConsolidateResult(
        status="done" if a.current else "not-current",
        exit_code=0 if a.current else EXIT_NOT_CURRENT,
        message="",
        run_id=rf.run.id,
        adapter_id=a.id,
        adapter_version=a.version,
        made_current=a.current,
        replaced=[x.version for x in stack],
        memories=len(held),
        steps=steps,
        init_kept=init_kept,
        phases_s=phases,
        before=before,
        after=after,
        worse=worse,
    )
    vs = ", ".join(f"v{x.version}" for x in stack)
    if a.current:
        res.message = f"consolidated {len(held)} memories of {vs} into adapter v{a.version}, now current"
        if worse:
            res.message += f" (retrained without forgotten memories, although {'; '.join(worse)})"
    else:
        why = "; ".join(worse) or "the current adapter changed while it trained"
        res.message = f"adapter v{a.version} kept but not made current ({why}); {vs} stays current"
    return res


def _recent_refusal(st: Store, stack: list[Adapter], retry_after: int) -> Adapter | None:
    """The gate's latest refusal of a consolidation of this stack (or of a part of it), when the stack has grown
    by fewer than `retry_after` adapters since: retrying sooner would most likely pay the same minutes again
    for the same answer. A consolidation made current and rolled back by hand does not count."""
    depth = {a.id: i for i, a in enumerate(stack)}
    refused = [a for a in st.adapters() if a.kind == "consolidate" and a.replaces in depth and a.metrics.get("worse")]
    if not refused:
        return None
    last = max(refused, key=lambda a: (depth[a.replaces], a.version))
    return last if len(stack) - 1 - depth[last.replaces] < retry_after else None


def consolidated_lora(cfg: Recipe) -> Lora:
    """The consolidated adapter's LoRA: `consolidate.rank`, at the scale (alpha / r) of the recipe's nights."""
    r = cfg.consolidate.rank or cfg.lora.r
    return cfg.lora.model_copy(update={"r": r, "alpha": max(1, round(cfg.lora.alpha * r / cfg.lora.r))})


def _night_groups(stack: list[Adapter], probes: list[Probe]) -> dict[str, list[Probe]]:
    """Held-out probes per adapter of the stack (per night): the gate checks each one."""
    out: dict[str, list[Probe]] = {}
    seen: set[str] = set()
    for a in stack:
        ids = set(a.trace_ids) - seen
        seen |= ids
        ps = [p for p in probes if p.trace_id in ids]
        if ps:
            out[f"v{a.version}"] = ps
    return out


@torch.no_grad()
def _gate(model, tok, groups: dict[str, list[Probe]], texts: list[str], cfg: Recipe, eng) -> dict[str, Any]:
    recall: dict[str, float | None] = {}
    for g, ps in groups.items():
        outs = answer(model, tok, ps, cfg, engine=eng)
        recall[g] = sum(recalled(o, p.answer, p.question, p.origin) for o, p in zip(outs, ps)) / len(ps)
    return {"recall": recall, "ppl": perplexity(model, tok, texts)}


def _null():
    from contextlib import nullcontext

    return nullcontext()


def _only_new(model, has_stack: bool):
    return active(model, [NEW]) if has_stack else _null()
