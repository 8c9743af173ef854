"""Knowledge Seeding: move pending memories from the teacher's context into a new LoRA adapter of the student.

    sleepctl seed --teacher small --student large

Read top to bottom: setup (recipe, memories, run folder, models), data (prompts, probes, teacher
answers; cached in the run folder), then one loop where each optimizer step computes

    loss = alpha * GKD + (1 - alpha) * LTI

GKD: per-token divergence D(teacher(.|c,x,y<t) || student(.|x,y<t)) on teacher samples, or, with
probability lmbda (ramped up from 0), on the student's own samples. LTI: the student continues a random
prefix of a teacher answer; reward gamma*r_sem + (1-gamma)*r_abs; group-relative advantages.
Only the new adapter trains; earlier adapters are merged, frozen, under it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from . import judge
from .engines import make_engine
from .errors import ModelError, RecipeError, SleepError
from .home import open_home
from .losses import abs_reward, divergence, group_advantages, lti_reward, policy_gradient_loss, sequence_logps
from .models import OFFLINE_MODELS, compare_tokenizers, load_model, resolve
from .prompts import (
    entity_prompts,
    parse_questions,
    question_request,
    render,
    restatement,
    restatement_prompts,
    user_turns,
)
from .recipe import Recipe, load_recipe
from .records import Probe, Trace
from .runs import (
    TrainState,
    apply_stack,
    config_hash,
    find_resumable,
    latest_checkpoint,
    lineage,
    load_checkpoint,
    publish_adapter,
    save_checkpoint,
    seed_everything,
    start_run,
)
from .scoring import grounded, token_f1
from .store import Store, new_id, now
from .training import adapter_state, add_lora, completion_logits, labels_tensor, make_optimizer, peak_memory_mb
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
    steps: int = 0
    resumed_from: int | None = None
    tokenizers: str | None = None  # identical | different (teacher vs student)
    wall_s: float = 0.0
    peak_memory_mb: float = 0.0
    final: dict[str, Any] = {}


class Interrupted(SleepError):
    exit_code = 130


@dataclass
class Example:
    trace_id: str
    prompt: str  # the user turn x
    samples: list[str]  # teacher answers given c and x


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


def load_student(st: Store, recipe: Recipe):
    """The student with every earlier adapter of the current lineage merged in, frozen."""
    name = recipe.model_name(recipe.student)
    model, tok = load_model(name, recipe.training.device, recipe.dtype(recipe.student))
    stack = lineage(st, st.current_adapter_id())
    for a in stack:
        if a.base_model != name:
            raise ModelError(
                f"the current adapter v{a.version} was trained on {a.base_model!r}, not the student {name!r}",
                hint="use the same student, or `sleepctl adapters rollback base`",
            )
    return apply_stack(model, stack), tok, stack


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


def served_dir(h, name: str, stack: list, merged_model) -> Path:
    """The folder vLLM loads: the student itself, or, under earlier adapters, their merge, saved once per stack."""
    if not stack:
        return resolve(name).path
    target = h.root / "cache" / "merged" / config_hash({"model": name, "stack": [a.id for a in stack]})
    if not (target / "config.json").exists():
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        merged_model.save_pretrained(tmp, safe_serialization=True)
        os.replace(tmp, target)
    return target


# --- data --------------------------------------------------------------------------------------------


def build_data(
    traces: list[Trace], recipe: Recipe, t_engine, t_tok, st: Store, rng: random.Random, seed: int
) -> tuple[list[Example], list[Probe]]:
    """Prompts, probes and teacher answers for every memory.

    Questions about a memory carry it; a user turn like "heads up: X moved" only draws an acknowledgement.
    So the teacher, seeing the memory, writes questions; some become probes, held out from training.
    """
    d = recipe.data
    sysp = d.system_prompt
    gen = dict(max_new_tokens=d.max_new_tokens)
    questions: dict[str, list[str]] = {t.id: [] for t in traces}
    if d.questions_per_memory + d.probes_per_memory > 0:
        asks = [
            render(t_tok, sysp, question_request(t.text, d.questions_per_memory + d.probes_per_memory)) for t in traces
        ]
        out = t_engine.generate(
            asks,
            max_new_tokens=max(128, 24 * (d.questions_per_memory + d.probes_per_memory)),
            temperature=0.0,
            seed=seed,
        )
        for t, text in zip(traces, out.texts):
            questions[t.id] = parse_questions(text, d.questions_per_memory + d.probes_per_memory)

    # Probes: a teacher question whose greedy and sampled answers agree and stay grounded in the memory.
    cand = [(t, q) for t in traces for q in questions[t.id][: max(d.probes_per_memory * 2, d.probes_per_memory)]]
    probes: list[Probe] = []
    if cand and d.probes_per_memory > 0:
        p_text = [render(t_tok, sysp, q, [t.text]) for t, q in cand]
        greedy = t_engine.generate(p_text, temperature=0.0, seed=seed, **gen).texts
        sampled = t_engine.generate(p_text, temperature=recipe.loss.teacher_temperature, seed=seed + 1, **gen).texts
        per_mem: dict[str, int] = {}
        for (t, q), a, b in zip(cand, greedy, sampled):
            if per_mem.get(t.id, 0) >= d.probes_per_memory:
                continue
            if a and token_f1(a, b) >= 0.4 and grounded(a, t.text):
                split = "heldout" if rng.random() < d.heldout_fraction else "train"
                probes.append(
                    Probe(
                        id=new_id("p"),
                        trace_id=t.id,
                        question=q,
                        answer=a,
                        origin="teacher",
                        split=split,
                        created_at=now(),
                    )
                )
                per_mem[t.id] = per_mem.get(t.id, 0) + 1
    heldout_q = {p.question for p in probes if p.split == "heldout"}
    user_heldout = {p.question for p in st.probes([t.id for t in traces], split="heldout")}

    prompts: list[tuple[Trace, str]] = []
    for t in traces:
        ps = (user_turns(t) if d.user_turns else []) + entity_prompts(t.text, d.entity_prompts)
        ps += [q for q in questions[t.id] if q not in heldout_q]
        seen = set()
        for p in ps:
            if p not in seen and p not in user_heldout:  # held-out probes never train
                seen.add(p)
                prompts.append((t, p))
    t_text = [render(t_tok, sysp, p, [t.text]) for t, p in prompts]
    answers = [t_engine.generate(t_text, temperature=0.0, seed=seed, **gen).texts] if prompts else []
    for k in range(1, d.teacher_samples if prompts else 0):
        answers.append(
            t_engine.generate(t_text, temperature=recipe.loss.teacher_temperature, seed=seed + 10 + k, **gen).texts
        )
    # Restatements: the teacher does not write these answers, it scores them. The output is the memory
    # itself (GKD's fixed-output data), so a weak teacher cannot drift from the facts.
    examples = [
        Example(t.id, p, [restatement(t)])
        for t in traces
        for p in restatement_prompts(t.text, d.restatements)
        if p not in user_heldout
    ]
    for i, (t, p) in enumerate(prompts):
        # An answer that is not grounded in the memory is the teacher inventing: never teach it.
        samples = list(
            dict.fromkeys(a[i] for a in answers if a[i].strip() and (not d.grounded_only or grounded(a[i], t.text)))
        )
        if samples:
            examples.append(Example(t.id, p, samples))
    if not examples:
        raise SleepError(
            "no training example could be made from the pending memories",
            hint="check the teacher model (a bigger teacher helps) and the data section of the recipe",
        )
    return examples, probes


# --- the loop ----------------------------------------------------------------------------------------


def seed(
    recipe: str | None = None,
    *,
    home: str | os.PathLike | None = None,
    teacher: str | None = None,
    student: str | None = None,
    since: str | None = None,
    overrides: dict | None = None,
    show_progress: bool = True,
) -> SeedResult:
    t_start = time.time()
    cfg = prepare(recipe, teacher, student, overrides)
    if cfg.engine == "vllm":
        require_vllm()  # before any model loads: a clear message in a second, not a traceback in a minute
    h = open_home(home)
    st = Store(h.db_path)
    try:
        pending = st.traces(status="pending", since=since)
        if not pending:
            return SeedResult(status="nothing", message="nothing to consolidate: no pending memories")
        return _seed(cfg, h, st, pending, t_start, show_progress)
    finally:
        st.close()


def _seed(cfg: Recipe, h, st: Store, pending: list[Trace], t_start: float, show_progress: bool) -> SeedResult:
    tr, lc = cfg.training, cfg.loss
    resolved = cfg.model_dump()
    mem_ids = [t.id for t in pending]
    parent = st.current_adapter_id()
    rf = find_resumable(h, st, "seed", resolved, mem_ids, {"parent": parent}) or start_run(
        h, st, "seed", resolved, mem_ids, {"parent": parent}
    )
    seed_everything(tr.seed)

    s_model, s_tok, stack = load_student(st, cfg)
    t_model, t_tok, tok_match = load_teacher(cfg, s_tok)
    device = next(s_model.parameters()).device
    student_name = cfg.model_name(cfg.student)
    s_dir = served_dir(h, student_name, stack, s_model) if cfg.engine == "vllm" else None

    model = add_lora(s_model, cfg.lora)
    teacher_model = t_model if t_model is not None else model  # "self": the same weights, adapter disabled

    def engine(m, tok, model_dir, lora_rank=None):
        return make_engine(
            cfg.engine,
            m,
            tok,
            cfg.eval.batch_size,
            model_dir=model_dir,
            vllm=cfg.vllm,
            lora_rank=lora_rank,
            seed=tr.seed,
            workdir=h.root / "tmp",
        )

    def teacher_ctx():
        return model.disable_adapter() if t_model is None else nullcontext()

    # Teacher data depends only on the memories, the teacher and the data knobs: cached per home, so
    # re-seeding the same memories with other loss settings does not pay for generation again.
    data_key = config_hash(
        {
            "mem": mem_ids,
            "teacher": cfg.model_name(cfg.teacher),
            "student": student_name,
            "data": cfg.data.model_dump(),
            "t_temp": lc.teacher_temperature,
            "seed": tr.seed,
        }
    )
    cached = h.root / "datasets" / f"{data_key}.json"
    data_path = rf.path / "data.json"
    if not data_path.exists() and cached.exists():
        shutil.copyfile(cached, data_path)
    if data_path.exists():
        examples = [Example(**e) for e in json.loads(data_path.read_text())["examples"]]
    else:
        err.print(f"[dim]writing prompts and teacher answers for {len(pending)} memories…[/dim]")
        t_dir = s_dir if t_model is None else (resolve(cfg.model_name(cfg.teacher)).path if s_dir else None)
        t_engine = engine(teacher_model, t_tok, t_dir)
        try:
            with teacher_ctx(), torch.no_grad():
                examples, probes = build_data(pending, cfg, t_engine, t_tok, st, random.Random(tr.seed), tr.seed)
        finally:
            t_engine.close()  # vLLM: its GPU memory goes back before the student's engine starts
        with st.transaction() as db:
            for p in probes:
                st.insert_probe(db, p)
        payload = json.dumps({"examples": [e.__dict__ for e in examples], "probes": [p.model_dump() for p in probes]})
        for dest in (data_path, cached):
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_suffix(".tmp")
            tmp.write_text(payload)
            os.replace(tmp, dest)

    opt, sched = make_optimizer(model, cfg.optim, tr.max_steps)
    start, resumed_from = 0, None
    ckpt = latest_checkpoint(rf)
    if ckpt is not None:
        state = load_checkpoint(ckpt, model, opt, sched)
        start = resumed_from = state.step
        err.print(f"[yellow]resuming run {rf.run.id} from step {state.step}[/yellow]")

    sysp = cfg.data.system_prompt
    mem_text = {t.id: t.text for t in pending}
    pad = s_tok.pad_token_id
    s_engine = engine(model, s_tok, s_dir, lora_rank=cfg.lora.r)
    engine_info: dict[str, Any] = {"engine": cfg.engine}
    last: dict[str, Any] = {}
    step = completed = saved = start
    progress = Progress(
        TextColumn("[bold]seed[/bold]"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        disable=not show_progress,
    )
    try:
        if cfg.engine == "vllm":  # a failed check ends the run like any failure below: marked failed, engine closed
            seqs = [
                s_tok(render(s_tok, sysp, e.prompt), add_special_tokens=False)["input_ids"]
                + _encode_answer(s_tok, e.samples[0])
                for e in examples[: cfg.vllm.check_sequences]
            ]
            check = check_logprobs(s_engine, model, seqs, pad, cfg.vllm.logprob_tolerance, seed=tr.seed)
            engine_info.update(start_s=s_engine.start_s, logprob_check=check)
            err.print(
                f"[dim]vLLM started in {s_engine.start_s:.0f} s; log-probs match the trainer's: mean |Δ| "
                f"{check['mean_abs_diff']:.4f}, max {check['max_abs_diff']:.3f} nats over {check['tokens']} tokens "
                f"(the adapter moves them by {check['lora_effect']:.3f})[/dim]"
            )
        with progress:
            task = progress.add_task("seed", total=tr.max_steps, completed=start, info="")
            for step in range(start, tr.max_steps):
                t0 = time.time()
                rng = random.Random(
                    tr.seed * 1_000_003 + step
                )  # per-step: a resumed run draws what a straight one would
                torch.manual_seed(tr.seed * 1_000_003 + step)
                batch = [examples[rng.randrange(len(examples))] for _ in range(tr.batch_size)]
                lmbda = lc.lmbda * min(1.0, step / lc.lmbda_warmup_steps) if lc.lmbda_warmup_steps else lc.lmbda
                on_policy = rng.random() < lmbda
                s_prompts = [render(s_tok, sysp, e.prompt) for e in batch]
                s_ids = [s_tok(p, add_special_tokens=False)["input_ids"] for p in s_prompts]
                m: dict[str, Any] = {"step": step + 1, "lmbda": lmbda, "on_policy": int(on_policy)}
                model.train()
                loss = torch.zeros((), device=device)
                rollout_tokens, rollout_s = 0, 0.0

                # Rollouts first, from the weights of this version; then the engine sleeps while the trainer steps.
                s_engine.sync(model, version=step)
                if lc.alpha > 0:
                    if on_policy:
                        tr0 = time.time()
                        ro = s_engine.generate(
                            s_prompts,
                            max_new_tokens=cfg.data.max_new_tokens,
                            temperature=lc.temperature,
                            seed=rng.randrange(2**31),
                        )
                        rollout_s += time.time() - tr0
                        rollout_tokens += ro.num_tokens
                        ys = [c if c else [s_tok.eos_token_id] for c in ro.completion_ids]
                    else:
                        ys = [_encode_answer(s_tok, rng.choice(e.samples)) for e in batch]
                if lc.alpha < 1:
                    lti_batch, info = _lti_rollouts(s_engine, s_tok, batch, s_prompts, cfg, rng)
                    rollout_tokens += info.pop("rollout_tokens")
                    rollout_s += info.pop("rollout_s")
                    m.update(info)
                s_engine.sleep()

                tt0 = time.time()
                if lc.alpha > 0:
                    t_prompts = [
                        t_tok(render(t_tok, sysp, e.prompt, [mem_text[e.trace_id]]), add_special_tokens=False)[
                            "input_ids"
                        ]
                        for e in batch
                    ]
                    with torch.no_grad(), teacher_ctx():
                        t_logits, _ = completion_logits(teacher_model, t_prompts, ys, pad)
                    s_logits, mask = completion_logits(model, s_ids, ys, pad)
                    kd = divergence(lc.divergence, s_logits, t_logits.to(s_logits.dtype), mask, lc.beta)
                    loss = loss + lc.alpha * kd
                    m["train/kd_loss"] = kd.item()
                    m["train/tokens"] = int(mask.sum())
                    del t_logits, s_logits

                if lc.alpha < 1:
                    lti = _lti_loss(model, s_tok, *lti_batch)
                    loss = loss + (1 - lc.alpha) * lti
                    m["train/lti_loss"] = lti.item()

                opt.zero_grad(set_to_none=True)
                loss.backward()
                gn = torch.nn.utils.clip_grad_norm_(
                    [p for p in model.parameters() if p.requires_grad], cfg.optim.grad_clip
                )
                if torch.isfinite(gn):
                    opt.step()
                else:  # a non-finite gradient (bf16 overflow) would poison the adapter: skip, as AMP does
                    m["skipped"] = 1
                    opt.zero_grad(set_to_none=True)
                sched.step()
                completed = step + 1
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                dt = time.time() - t0
                m["train_s"] = time.time() - tt0
                m.update(
                    {
                        "loss": loss.item(),
                        "grad_norm": float(gn) if torch.isfinite(gn) else None,
                        "lr": sched.get_last_lr()[0],
                        "step_s": dt,
                        "tokens_per_second": m.get("train/tokens", 0) / dt if dt else 0.0,
                        "train/tokens_per_s": m.get("train/tokens", 0) / m["train_s"] if m["train_s"] else 0.0,
                        "rollout/tokens_per_s": rollout_tokens / rollout_s if rollout_s else None,
                        "time": now(),
                    }
                )
                rf.metrics.log(m)
                last = m
                info = f"loss {m['loss']:.3f}" + (f" kd {m['train/kd_loss']:.3f}" if "train/kd_loss" in m else "")
                info += f" r {m['reward/mean']:.2f}" if "reward/mean" in m else ""
                info += f" λ {lmbda:.2f}"
                progress.update(task, completed=step + 1, info=info)
                if completed % tr.checkpoint_every == 0 and completed < tr.max_steps:
                    save_checkpoint(
                        rf, completed, adapter_state(model), opt, sched, TrainState(step=completed, seed=tr.seed)
                    )
                    saved = completed
    except KeyboardInterrupt:
        # Ctrl-C: keep every finished step (the one in flight is dropped), so the same command resumes here.
        if completed > saved:
            save_checkpoint(rf, completed, adapter_state(model), opt, sched, TrainState(step=completed, seed=tr.seed))
        st.update_run(rf.run.id, "interrupted", {"steps": completed})
        raise Interrupted(
            f"interrupted after step {completed}; run the same command again to resume", hint=f"run {rf.run.id}"
        ) from None
    except Exception:
        st.update_run(rf.run.id, "failed", {"steps": completed})
        raise
    finally:
        s_engine.close()
    if cfg.engine == "vllm":
        engine_info["timings"] = s_engine.timings

    wall = time.time() - t_start
    peak = peak_memory_mb(device)
    metrics = {
        "steps": tr.max_steps,
        "final_loss": last.get("loss"),
        "wall_s": wall,
        "peak_memory_mb": peak,
        "examples": len(examples),
        "memories": len(pending),
        "tokenizers": tok_match,
        "engine": engine_info,
    }
    try:
        a = publish_adapter(
            h,
            st,
            model,
            run_id=rf.run.id,
            kind="seed",
            base_model=student_name,
            parent_id=st.current_adapter_id(),
            trace_ids=[t.id for t in pending],
            metrics=metrics,
        )
    except SleepError:
        st.update_run(rf.run.id, "failed", metrics)
        raise
    st.update_run(rf.run.id, "done", {**metrics, "adapter_id": a.id, "adapter_version": a.version})
    (rf.path / "summary.json").write_text(
        json.dumps({**metrics, "adapter_id": a.id, "adapter_version": a.version}, indent=2)
    )
    return SeedResult(
        status="done",
        message=f"consolidated {len(pending)} memories into adapter v{a.version}",
        run_id=rf.run.id,
        run_dir=str(rf.path),
        adapter_id=a.id,
        adapter_version=a.version,
        memories=len(pending),
        steps=tr.max_steps,
        resumed_from=resumed_from,
        tokenizers=tok_match,
        wall_s=wall,
        peak_memory_mb=peak,
        final=last,
    )


def _encode_answer(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def _lti_rollouts(engine, tok, batch: list[Example], s_prompts: list[str], cfg: Recipe, rng: random.Random):
    """Learning to Imitate, sampling half: continue a random prefix of a teacher answer; group-relative advantages."""
    lc = cfg.loss
    G = lc.num_generations
    n = max(1, len(batch) // G)
    prompts, targets = [], []
    for i in rng.sample(range(len(batch)), n):
        words = rng.choice(batch[i].samples).split()
        k = rng.randint(0, len(words) // 2)
        prefix = " ".join(words[:k])
        prompts.append(s_prompts[i] + prefix)
        targets.append(" ".join(words[k:]))
    t0 = time.time()
    # the continuation need not run much past the target: cheaper rollouts, same reward
    budget = min(cfg.data.max_new_tokens, max(len(tok(t, add_special_tokens=False)["input_ids"]) for t in targets) + 8)
    ro = engine.generate(
        prompts,
        max_new_tokens=budget,
        temperature=lc.temperature,
        num_samples=G,
        seed=rng.randrange(2**31),
    )
    rollout_s = time.time() - t0
    tgt = [t for t in targets for _ in range(G)]
    r_abs = torch.tensor([abs_reward(p, t, lc.z0) for p, t in zip(ro.texts, tgt)])
    r_sem = (judge.similarity(ro.texts, tgt) >= lc.sem_threshold).float() if lc.gamma > 0 else torch.zeros_like(r_abs)
    rewards = lti_reward(r_sem, r_abs, lc.gamma)
    adv = group_advantages(rewards, G, lc.scale_rewards)
    comps = [c if c else [tok.eos_token_id] for c in ro.completion_ids]
    return (ro.prompt_ids, comps, adv), {
        "reward/mean": rewards.mean().item(),
        "reward/r_abs": r_abs.mean().item(),
        "reward/r_sem": r_sem.mean().item(),
        "rollout_tokens": ro.num_tokens,
        "rollout_s": rollout_s,
    }


def _lti_loss(model, tok, prompt_ids: list[list[int]], comps: list[list[int]], adv: torch.Tensor) -> torch.Tensor:
    """Learning to Imitate, gradient half: the policy-gradient loss of the rollouts under the current weights."""
    device = next(model.parameters()).device
    logits, mask = completion_logits(model, prompt_ids, comps, tok.pad_token_id)
    logps = sequence_logps(logits, labels_tensor(comps, device))
    return policy_gradient_loss(logps, adv.to(device), mask)
