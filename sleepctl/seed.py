"""Knowledge Seeding: move pending memories from the teacher's context into a new LoRA adapter of the student.

    sleepctl seed --teacher small --student large

Read top to bottom: setup (recipe, memories, run folder, models), data (prompts, probes and teacher
answers for tonight's memories; earlier memories that tonight's correct are answered again with both in
view), the replay pool of earlier memories, then the one training loop (loop.py) with the seed objective
(objectives.py):

    loss = alpha * GKD + (1 - alpha) * LTI + kl_coef * KL(base || student) on general text

Only the new adapter trains; earlier adapters sit under it as one frozen adapter, never merged, so the
base is always one `disable_adapter()` away (the anchor's reference).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel
from rich.console import Console

from . import distributed
from .adapters import lineage, publish_adapter, stack_lora
from .anchor import AnchorText, kl_drift
from .data import (
    CITES_MEMORIES,
    STALLS,
    TAKEN_BACK,
    TAUGHT_CORRECTED,
    Example,
    build_data,
    context,
    link,
    recheck,
    refresh,
    superseded,
)
from .engines import lora_capacity, release_engines, rollout_engine
from .errors import ModelError, RecipeError, SleepError
from .home import open_home, sleep_lock, write_atomic
from .loop import Interrupted, train  # noqa: F401 - Interrupted is part of this module's API
from .models import OFFLINE_MODELS, compare_tokenizers, load_model, resolve
from .objectives import SeedObjective, encode_answer
from .prompts import render
from .recipe import Recipe, load_recipe
from .records import Probe, Trace, since_timestamp
from .replay import NightBatches, cached_examples, choose, memory_losses, without_stale
from .runs import (
    RunFolder,
    config_hash,
    find_resumable,
    latest_checkpoint,
    load_checkpoint,
    run_status,
    seed_everything,
    start_run,
    sweep,
)
from .store import Store
from .training import add_lora, compile_layers, eager, make_optimizer, peak_memory_mb
from .vllm_engine import check_logprobs, require_vllm

err = Console(stderr=True, soft_wrap=True)


class SeedResult(BaseModel):
    status: str  # done | nothing
    message: str
    run_id: str | None = None
    run_dir: str | None = None
    adapter_id: str | None = None
    adapter_version: int | None = None
    memories: int = 0
    replayed: int = 0
    steps: int = 0
    resumed_from: int | None = None
    tokenizers: str | None = None  # identical | different (teacher vs student)
    kl_drift: float | None = None
    wall_s: float = 0.0
    peak_memory_mb: float = 0.0
    final: dict[str, Any] = {}


# --- setup -----------------------------------------------------------------------------------------


def resolve_ref(recipe: Recipe, ref: str, role: str) -> str:
    """A profile, 'self' (teacher only), or a model name; a bare unknown word is a missing profile."""
    if ref == "self" and role == "teacher":
        return "self"
    if ref in recipe.profiles or ref in OFFLINE_MODELS or Path(ref).expanduser().exists() or "/" in ref:
        return ref
    raise RecipeError(
        f"unknown {role} profile {ref!r}",
        hint=f"the recipe defines: {', '.join(recipe.profiles)}; or give a model alias, path or id",
    )


def prepare(recipe_ref: str | None, teacher: str | None, student: str | None, overrides: dict | None) -> Recipe:
    recipe, _ = load_recipe(recipe_ref, overrides)
    if teacher is not None:
        recipe.teacher = teacher
    if student is not None:
        recipe.student = student
    recipe.teacher = resolve_ref(recipe, recipe.teacher, "teacher")
    recipe.student = resolve_ref(recipe, recipe.student, "student")
    return recipe


def check_ranks(cfg: Recipe, ranks: distributed.Ranks) -> None:
    """What several processes (torchrun) need, said before anything loads."""
    if not ranks.active:
        return
    if cfg.training.batch_size < ranks.world:
        raise RecipeError(
            f"training.batch_size {cfg.training.batch_size} is smaller than the {ranks.world} processes",
            hint="every process trains on its share of a batch: raise training.batch_size or start fewer",
        )


def check_stack(stack: list, name: str) -> None:
    for a in stack:
        if a.base_model != name:
            raise ModelError(
                f"the current adapter v{a.version} was trained on {a.base_model!r}, not the student {name!r}",
                hint="use the same student, or `sleepctl adapters rollback base`",
            )


def load_teacher(recipe: Recipe, student_tok):
    if recipe.teacher == "self":
        return None, student_tok, "identical"
    name = recipe.model_name(recipe.teacher)
    model, tok = load_model(name, recipe.training.device, recipe.dtype(recipe.teacher))
    match = compare_tokenizers(tok, student_tok)
    if match == "different" and recipe.loss.alpha > 0:
        raise ModelError(
            f"teacher {name!r} and student {recipe.model_name(recipe.student)!r} have different tokenizers; the KL terms need identical vocabularies",
            hint="set loss.alpha: 0 to run Learning-to-Imitate alone (its rewards are on text), or pick a teacher of the same family",
        )
    return model, tok, match


def engines_for(cfg: Recipe, h, s_model, s_tok, t_model, t_tok, lora_rank: int, teacher: bool = True):
    """(teacher engine, student engine). With vLLM, a 'self' teacher is the student's engine with no adapter.
    `teacher` False: no teacher engine (ranks other than 0 read rank 0's teacher data)."""
    s_name = cfg.model_name(cfg.student)
    s_eng = rollout_engine(cfg, s_model, s_tok, resolve(s_name).path if cfg.engine == "vllm" else None, lora_rank, h)
    if not teacher:
        return None, s_eng
    if t_model is None:
        return s_eng, s_eng
    t_dir = resolve(cfg.model_name(cfg.teacher)).path if cfg.engine == "vllm" else None
    return rollout_engine(cfg, t_model, t_tok, t_dir, None, h, teacher=True), s_eng


# --- the run ---------------------------------------------------------------------------------------


def seed(
    recipe: str | None = None,
    *,
    home: str | os.PathLike | None = None,
    teacher: str | None = None,
    student: str | None = None,
    since: str | None = None,
    overrides: dict | None = None,
    show_progress: bool = True,
    keep_engines: bool = False,
) -> SeedResult:
    """Consolidate pending memories into a new adapter. `keep_engines`: leave vLLM engines running for the
    next job of this process (a multi-night script); otherwise they are shut down at the end."""
    t_start = time.time()
    since = since_timestamp(since) if since else None
    cfg = prepare(recipe, teacher, student, overrides)
    check_ranks(cfg, distributed.from_env())
    if cfg.engine == "vllm":
        require_vllm()  # before any model loads: a clear message in a second, not a traceback in a minute
    h = open_home(home)
    ranks = distributed.setup(cfg.training.device)  # one process: rank 0 of 1, and nothing changes
    # rank 0 owns the home (the lock, the sweep, every write); the others read what it decided
    with sleep_lock(h, "seed") if ranks.main else nullcontext():
        st = Store(h.db_path, readonly=not ranks.main)
        try:
            if ranks.main:
                sweep(h, st)  # what a job that died left behind
            pending = st.traces(status="pending", since=since)
            if ranks.active:  # the memories rank 0 found, whatever was recorded meanwhile
                by_id = {t.id: t for t in st.traces()}
                pending = [by_id[i] for i in distributed.broadcast(ranks, [t.id for t in pending])]
            if not pending:
                return SeedResult(status="nothing", message="nothing to consolidate: no pending memories")
            return _seed(cfg, h, st, pending, t_start, show_progress and ranks.main, ranks)
        finally:
            st.close()
            if not keep_engines:
                release_engines()


def _seed(
    cfg: Recipe, h, st: Store, pending: list[Trace], t_start: float, show_progress: bool, ranks: distributed.Ranks
) -> SeedResult:
    resolved = cfg.model_dump()
    mem_ids = [t.id for t in pending]
    parent = st.current_adapter_id()  # read once: the parent recorded is the one trained on
    if not ranks.main:  # rank 0's run folder
        run, path = distributed.broadcast(ranks, None)
        return _seed_run(cfg, h, st, pending, RunFolder(run, path), parent, t_start, show_progress, ranks)
    rf = find_resumable(h, st, "seed", resolved, mem_ids, {"parent": parent}) or start_run(
        h, st, "seed", resolved, mem_ids, {"parent": parent}
    )
    distributed.broadcast(ranks, (rf.run, rf.path))
    with run_status(st, rf):
        return _seed_run(cfg, h, st, pending, rf, parent, t_start, show_progress, ranks)


def _seed_run(
    cfg: Recipe, h, st: Store, pending, rf, parent, t_start: float, show_progress: bool, ranks: distributed.Ranks
) -> SeedResult:
    tr = cfg.training
    mem_ids = [t.id for t in pending]
    student_name = cfg.model_name(cfg.student)
    stack = lineage(st, parent)
    check_stack(stack, student_name)
    held = st.traces(status="consolidated")  # what the current stack holds: replay candidates
    related = link(pending, held, cfg.replay.max_related)
    touched = sorted({o.id for n in pending for o in related.get(n.id, []) if o.status == "consolidated"})
    by_id = {t.id: t for t in [*held, *pending]}

    seed_everything(tr.seed)  # the new adapter's initial weights come from torch's generator
    base, s_tok = load_model(student_name, tr.device, cfg.dtype(cfg.student))
    t_model, t_tok, tok_match = load_teacher(cfg, s_tok)
    model = add_lora(base, cfg.lora, stack, fused=tr.fused_lora)
    teacher_model = t_model if t_model is not None else model
    t_engine, s_engine = engines_for(
        cfg, h, model, s_tok, t_model, t_tok, lora_capacity(cfg, len(stack)), teacher=ranks.main
    )
    s_engine.frozen = stack_lora(stack)

    # the teacher answers with no adapter: a 'self' teacher is the student with its adapters off
    teacher_view = model.disable_adapter if t_model is None else nullcontext
    olds = [by_id[i] for i in touched]
    everyone = [*held, *pending]
    # what the teacher sees beside an earlier memory when it rewrites its answers: the newer memories that
    # touch it among them (linked from the old memory's side; `related` only holds tonight's memories' links)
    old_related = link(olds, everyone, cfg.replay.max_related)
    if not ranks.main:
        distributed.barrier(ranks)  # rank 0 writes the data and picks the replay pool; the others read them
    examples, refreshed, fresh_probes = _teacher_data(  # the other ranks (no teacher engine) only read rank 0's
        cfg, h, st, rf, pending, olds, related, old_related, t_engine, t_tok, teacher_view
    )
    if ranks.main and not (rf.path / "stored").exists():  # once per run: a resumed run does not store again
        _store_data(st, rf.run.id, examples, refreshed, fresh_probes)
        _supersede(cfg, st, pending, touched, by_id, old_related, t_engine, t_tok, teacher_view, tr.seed)
        (rf.path / "stored").touch()
    pool = _replay_pool(cfg, st, rf, model, s_tok, held, mem_ids, by_id, touched, refreshed)
    if ranks.main:
        distributed.barrier(ranks)
    # the corrected memories' rewritten answers are tonight's news too, where the recipe says so
    tonight = [*examples, *refreshed] if cfg.replay.corrected == "tonight" else examples
    contexts = {
        tid: context(by_id[tid], link([by_id[tid]], everyone, cfg.replay.max_related))
        for tid in {*mem_ids, *pool, *(e.trace_id for e in tonight)}
    }
    batches = distributed.shard(NightBatches(tonight, pool, cfg.replay.fraction, tr.batch_size), ranks)
    anchor = AnchorText(s_tok, cfg) if cfg.anchor.kl_coef > 0 else None

    steps = cfg.night_steps(len(pending))
    opt, sched = make_optimizer(model, cfg.optim, steps)
    start, resumed_from = 0, None
    ckpt = latest_checkpoint(rf)
    if ckpt is not None:
        state = load_checkpoint(ckpt, model, opt, sched)
        start = resumed_from = state.step
        err.print(f"[yellow]resuming run {rf.run.id} from step {state.step}[/yellow]")

    engine_info: dict[str, Any] = {"engine": cfg.engine}
    if cfg.engine == "vllm":
        engine_info.update(start_s=s_engine.start_s, logprob_check=vllm_check(s_engine, model, s_tok, examples, cfg))
    if tr.compile:  # after the teacher data and the replay scores: their forwards are one-offs
        engine_info["compiled_layers"] = compile_layers(model) + (compile_layers(t_model) if t_model else 0)
    forward = distributed.wrap(model, ranks)  # every gradient-carrying forward: through DDP on several ranks
    objective = SeedObjective(
        model, teacher_model, s_tok, t_tok, s_engine, cfg, contexts, batches, anchor, steps, forward=forward
    )
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
        rf=rf if ranks.main else None,  # rank 0 logs and checkpoints; every rank resumes from its checkpoints
        checkpoint_every=tr.checkpoint_every,
        label="seed",
        show_progress=show_progress,
    )
    if cfg.engine == "vllm":
        engine_info["timings"] = dict(s_engine.timings)
    if not distributed.weights_agree(model, ranks):
        raise SleepError(
            f"the {ranks.world} processes ended with different adapters: nothing published",
            hint="a bug: report it with the run folder",
        )
    if not ranks.main:
        distributed.gather(ranks, peak_memory_mb(next(model.parameters()).device))  # the trainers' own peaks
        distributed.barrier(ranks)  # until rank 0 has published
        return SeedResult(status="done", message=f"rank {ranks.rank} trained its share", run_id=rf.run.id)
    with eager(model):  # a few forwards in modes of their own: not worth their compilations
        drift = kl_drift(model, s_tok, cfg)
    peaks = distributed.gather(ranks, peak_memory_mb(next(model.parameters()).device))  # the drift check included
    wall = time.time() - t_start
    peak = peaks[0]
    metrics = {
        "steps": steps,
        "final_loss": loop.last.get("loss"),
        "skipped_steps": loop.skipped,
        "wall_s": wall,
        "peak_memory_mb": peak,
        "examples": len(examples),
        "memories": len(pending),
        "replayed": len(pool),
        "refreshed_memories": len({e.trace_id for e in refreshed}),
        "kl_drift": drift,
        "tokenizers": tok_match,
        "engine": engine_info,
        "processes": ranks.world,
    }
    if ranks.active:
        metrics["peak_memory_mb_per_rank"] = peaks
    a = publish_adapter(
        h,
        st,
        model,
        run_id=rf.run.id,
        kind="seed",
        base_model=student_name,
        parent_id=parent,
        trace_ids=mem_ids,
        metrics=metrics,
        expect_current=parent,
    )
    st.update_run(rf.run.id, "done", {**metrics, "adapter_id": a.id, "adapter_version": a.version})
    (rf.path / "summary.json").write_text(
        json.dumps({**metrics, "adapter_id": a.id, "adapter_version": a.version, "current": a.current}, indent=2)
    )
    distributed.barrier(ranks)
    note = "" if a.current else " (not made current: the current adapter changed while it trained)"
    return SeedResult(
        status="done",
        message=f"consolidated {len(pending)} memories into adapter v{a.version}{note}"
        + (f", replaying {len(pool)} earlier ones" if pool else ""),
        run_id=rf.run.id,
        run_dir=str(rf.path),
        adapter_id=a.id,
        adapter_version=a.version,
        memories=len(pending),
        replayed=len(pool),
        steps=steps,
        resumed_from=resumed_from,
        tokenizers=tok_match,
        kl_drift=drift,
        wall_s=wall,
        peak_memory_mb=peak,
        final=loop.last,
    )


def _teacher_data(cfg: Recipe, h, st: Store, rf, pending, olds, related, old_related, t_engine, t_tok, teacher_view):
    """Tonight's examples and probes, and the rewritten answers of earlier memories tonight's correct
    (`old_related`: what the teacher sees beside each of those, the newer memories included).

    They depend on the memories, what the teacher sees beside them, the teacher and the data knobs: cached per
    home, so re-seeding after a rollback with other loss settings does not generate them again.
    """
    tr = cfg.training
    data_key = config_hash(
        {
            "mem": [t.id for t in pending],
            "related": {k: [o.id for o in v] for k, v in sorted(related.items())},
            "old_related": {k: [o.id for o in v] for k, v in sorted(old_related.items())},
            "teacher": cfg.model_name(cfg.teacher),
            "student": cfg.model_name(cfg.student),
            # without reverse questions their knobs change nothing: a home's data cached before they existed holds
            "data": cfg.data.model_dump(
                exclude={"reverse_questions", "max_prompt_overlap"} if not cfg.data.reverse_questions else None
            ),
            "t_temp": cfg.loss.teacher_temperature,
            "seed": tr.seed,
        }
    )
    cached = h.root / "datasets" / f"{data_key}.json"
    data_path = rf.path / "data.json"
    if not data_path.exists() and cached.exists():
        shutil.copyfile(cached, data_path)
    if data_path.exists():
        d = json.loads(data_path.read_text())
        return (
            [Example(**e) for e in d["examples"]],
            [Example(**e) for e in d.get("refreshed", [])],
            [Probe(**p) for p in d.get("probes", [])],
        )
    if t_engine is None:  # a rank other than 0, after rank 0 wrote the data: it is on disk, or something is wrong
        raise SleepError(
            f"rank 0's teacher data is not in {data_path}",
            hint="every process must see the home on one filesystem (several nodes: a shared one)",
        )
    err.print(f"[dim]writing prompts and teacher answers for {len(pending)} memories…[/dim]")
    dropped: list[dict[str, str]] = []
    with torch.no_grad(), teacher_view():
        t_engine.serve(None)
        examples, probes = build_data(
            pending, cfg, t_engine, t_tok, st, random.Random(tr.seed), tr.seed, related, dropped
        )
        old_data = cached_examples(st, olds, cfg.data.restatements)
        refreshed = refresh(olds, old_data, cfg, t_engine, t_tok, old_related, tr.seed) if olds else []
    fixed = sum(x["why"].startswith(TAUGHT_CORRECTED) for x in dropped)
    left_out = [x for x in dropped if not x["why"].startswith(TAUGHT_CORRECTED)]
    made_up = [x for x in left_out if x["why"].startswith("states ")]
    citing = sum(x["why"] == CITES_MEMORIES for x in left_out)
    stalling = sum(x["why"] == STALLS for x in left_out)
    taken = sum(x["why"].startswith(TAKEN_BACK) for x in left_out)
    if left_out:
        names = sorted({x["why"].removeprefix("states ") for x in made_up})[:3]
        eg = " (e.g. " + "; ".join(names) + ")" if names else ""
        stall = f", {stalling} for only announcing a lookup as the chat did before a tool result" if stalling else ""
        stall += f", {taken} for repeating what the chat later corrected" if taken else ""
        err.print(
            f"[dim]{len(left_out) - len(made_up) - citing - stalling - taken} teacher answers left out as not grounded"
            f" in the memory, {len(made_up)} for stating a name or value it lacks{eg}, {citing} for talking about the "
            f"memories it was shown{stall}; the run's data.json lists them[/dim]"
        )
    if fixed:
        err.print(
            f"[dim]{fixed} teacher answers stated a value their chat later corrected: taught with the correction in "
            "its place (data.json lists them)[/dim]"
        )
    payload = json.dumps(
        {
            "examples": [e.__dict__ for e in examples],
            "refreshed": [e.__dict__ for e in refreshed],
            "probes": [p.model_dump() for p in probes],
            "dropped": dropped,
        }
    )
    for dest in (data_path, cached):
        dest.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(dest, payload)
    return examples, refreshed, probes


def _replay_pool(cfg: Recipe, st: Store, rf, model, s_tok, held, mem_ids, by_id, touched, refreshed):
    """Earlier memories replayed tonight, chosen once per run (saved: a resumed run replays the same ones).

    A memory tonight corrects is always replayed (unless `replay.corrected` trains it beside tonight's), with
    its rewritten answers, so the new value overwrites the old one over the frozen stack; its restatement
    (its own, now stale, text) is not.
    """
    tr = cfg.training
    pool_path = rf.path / "replay.json"
    candidates = [t for t in held if t.id not in set(mem_ids)]
    if pool_path.exists():
        pool_ids = json.loads(pool_path.read_text())
    else:
        losses = None
        if cfg.replay.sampling == "weakest" and len(candidates) > cfg.replay.max_memories > 0:
            losses = memory_losses(
                model, s_tok, cfg.data.system_prompt, cached_examples(st, candidates, cfg.data.restatements)
            )
        pool_ids = [t.id for t in choose(candidates, cfg, tr.seed, losses)]
        pool_path.write_text(json.dumps(pool_ids))
    pool = without_stale(cached_examples(st, [by_id[i] for i in pool_ids], cfg.data.restatements), by_id, set(touched))
    corrected = {e.trace_id for e in refreshed}
    if cfg.replay.corrected == "tonight":  # they train beside tonight's memories, not once more in the pool
        return {tid: es for tid, es in pool.items() if tid not in corrected}
    if cfg.replay.fraction > 0:
        for tid in corrected:
            pool[tid] = [e for e in refreshed if e.trace_id == tid]
    return pool


def vllm_check(s_engine, model, s_tok, examples: list[Example], cfg: Recipe) -> dict:
    """The engine's log-probs must match the trainer's, or its rollouts are off-policy: checked before training."""
    seqs = [
        s_tok(render(s_tok, cfg.data.system_prompt, e.prompt), add_special_tokens=False)["input_ids"]
        + encode_answer(s_tok, e.samples[0])
        for e in examples[: cfg.vllm.check_sequences]
    ]
    check = check_logprobs(
        s_engine,
        model,
        seqs,
        s_tok.pad_token_id,
        cfg.vllm.logprob_tolerance,
        seed=cfg.training.seed,
        rel_tolerance=cfg.vllm.logprob_rel_tolerance,
    )
    err.print(
        f"[dim]vLLM log-probs match the trainer's: mean |Δ| {check['mean_abs_diff']:.4f}, max "
        f"{check['max_abs_diff']:.3f} nats over {check['tokens']} tokens (the adapter moves them by "
        f"{check['lora_effect']:.3f})[/dim]"
    )
    return check


def _store_data(st: Store, run_id: str, examples: list[Example], refreshed: list[Example], probes: list[Probe]) -> None:
    """Tonight's teacher data goes into the store (replay and consolidation read it there), once per run."""
    with st.transaction() as db:
        db.execute("DELETE FROM examples WHERE run_id=?", (run_id,))
        st.insert_examples(db, run_id, [(e.trace_id, e.prompt, e.samples) for e in [*examples, *refreshed]])
        for p in probes:
            st.insert_probe(db, p)


def _supersede(cfg, st, pending, touched, by_id, old_related, t_engine, t_tok, teacher_view, seed) -> None:
    """Probes of earlier memories that a newer memory answers differently stop counting (eval skips them)."""
    marks = superseded(pending, list(by_id.values()), st.probes())
    if touched:
        olds = [by_id[i] for i in touched]
        with torch.no_grad(), teacher_view():  # the earlier memories seen as their rewrite saw them
            t_engine.serve(None)
            marks += recheck(olds, st.probes(touched), cfg, t_engine, t_tok, old_related, seed)
    if marks:
        with st.transaction() as db:
            for pid, by in marks:
                st.supersede_probe(db, pid, by)
