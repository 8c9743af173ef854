"""Dreaming: the model rehearses its recent memories on data it writes itself (SEAL-style ReST-EM).

    sleepctl dream --max-minutes 30            # nightly, from cron; one at a time, resumable

Read top to bottom. Under an exclusive lock, for the memories of the newest sleep plus a replay sample
of older ones:
1. dream: the student, memory in its prompt, writes `m` dreams per memory (implications, question-answer
   pairs, rephrasings, combinations of two memories); diversity from temperature and random adapter
   dropout (a share of the dreams is written by the model without its newest adapter);
2. select: score each dream by the cosine between its SFT gradient and the gradient of the memory's
   reward-probe loss, on the new adapter's parameters; keep the top `k` plus `b` random ones;
3. reward: apply each kept dream to an isolated copy of the new adapter for a few SFT steps; reward 1
   when the memory's reward-probe NLL drops (by `reward_margin`) below the untouched model's;
4. ReST-EM: train the new adapter on the rewarded dreams mixed with replay of older memories. The
   student is both the dreams' generator and the consolidation target, so this step trains both;
5. publish the adapter; make it current only when held-out recall and retention did not get worse.
Reward probes are the teacher's train-split probes (or, where a memory has none, its restatement);
the held-out probes that decide step 5 are never used for the reward. Each phase writes its result to
the run folder, so a killed or time-limited run continues where it stopped.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import random
import re
import time
from contextlib import contextmanager
from typing import Any

import torch
from pydantic import BaseModel
from rich.console import Console

from .engines import HFEngine
from .errors import LockedError
from .evaluate import answer
from .home import Home, open_home
from .models import load_model
from .prompts import entities, render, restatement
from .recipe import Recipe, load_recipe
from .records import Probe, Trace
from .runs import (
    RunFolder,
    TrainState,
    apply_stack,
    find_resumable,
    latest_checkpoint,
    lineage,
    load_checkpoint,
    publish_adapter,
    save_checkpoint,
    seed_everything,
    start_run,
)
from .scoring import contains_match
from .store import Store, now
from .training import adapter_state, add_lora, bf16_compute, make_optimizer, pad_right

err = Console(stderr=True)

# Exit codes beside the common ones (README): the run finished but its adapter is not current, or the
# time budget ran out before training (the next run resumes).
EXIT_NOT_CURRENT = 3
EXIT_STOPPED = 4

KEEP = "Keep every name, number and date exactly as written."
DREAM_PROMPTS = {
    "implication": "Here is something you remember:\n\n{m}\n\nWrite two or three sentences on what follows from it: "
    "consequences, who is affected, what happens next. " + KEEP,
    "qa": "Here is something you remember:\n\n{m}\n\nWrite three questions about it, each followed by its answer, "
    "in the form 'Q: ... A: ...'. " + KEEP,
    "rephrase": "Here is something you remember:\n\n{m}\n\nRestate it in your own words as a short paragraph. " + KEEP,
    "combine": "Here are two things you remember:\n\n{m}\n\n{m2}\n\nWrite a short paragraph that mentions both. "
    + KEEP,
}


class DreamResult(BaseModel):
    status: str  # done | not-current | nothing | stopped
    message: str
    exit_code: int = 0
    run_id: str | None = None
    adapter_id: str | None = None
    adapter_version: int | None = None
    made_current: bool = False
    memories: int = 0
    replay: int = 0
    dreams: int = 0
    kept: int = 0
    rewarded: int = 0
    steps: int = 0
    before: dict[str, float | None] = {}
    after: dict[str, float | None] = {}
    wall_s: float = 0.0


class Pair(BaseModel):
    """One training example: a closed-book prompt and the answer to learn."""

    prompt: str
    answer: str


# --- lock and log ---------------------------------------------------------------------------------------


@contextmanager
def dream_lock(h: Home):
    """flock: released by the kernel when the process dies, SIGKILL included, so no stale lock."""
    path = h.root / "dream.lock"
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip()
        f.close()
        raise LockedError(
            f"another dream run holds {path}{f' ({holder})' if holder else ''}", hint="wait for it to finish"
        ) from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} since {now()}\n")
    f.flush()
    try:
        yield
    finally:
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


class Log:
    """To the terminal and to $HOME/logs/dream.log, so a cron run leaves a trace."""

    def __init__(self, h: Home, quiet: bool = False):
        h.logs_dir.mkdir(exist_ok=True)
        self.path = h.logs_dir / "dream.log"
        self.quiet = quiet

    def __call__(self, msg: str) -> None:
        with open(self.path, "a") as f:
            f.write(f"{now()} {msg}\n")
        if not self.quiet:
            err.print(f"[dim]{msg}[/dim]", highlight=False)


# --- data ----------------------------------------------------------------------------------------------


def restatement_pair(t: Trace) -> Pair:
    names = entities(t.text, 1)
    return Pair(
        prompt=f"What do you remember about {names[0]}?" if names else "What do you remember?", answer=restatement(t)
    )


def dream_pairs(dream: dict[str, Any], t: Trace) -> list[Pair]:
    """A QA dream becomes its question-answer pairs; any other dream answers 'what do you remember about X?'."""
    if dream["kind"] == "qa":
        pairs = [
            Pair(prompt=q.strip(), answer=a.strip())
            for q, a in re.findall(r"Q:\s*(.+?)\s*A:\s*(.+?)(?=\s*Q:|\Z)", dream["text"], flags=re.S)
            if q.strip() and a.strip()
        ]
        if pairs:
            return pairs
    return [Pair(prompt=restatement_pair(t).prompt, answer=dream["text"])]


def reward_pairs(t: Trace, probes: list[Probe]) -> list[Pair]:
    train = [Pair(prompt=p.question, answer=p.answer) for p in probes if p.trace_id == t.id and p.split == "train"]
    return train or [restatement_pair(t)]


def encode(tok, sysp: str, pairs: list[Pair]) -> tuple[list[list[int]], list[int]]:
    """Token ids of prompt + answer, and where each answer starts: the loss covers answers only."""
    seqs, starts = [], []
    for p in pairs:
        prompt = tok(render(tok, sysp, p.prompt), add_special_tokens=False)["input_ids"]
        answer = tok(p.answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        seqs.append(prompt + answer)
        starts.append(len(prompt))
    return seqs, starts


def sft_loss(model, tok, sysp: str, pairs: list[Pair]) -> torch.Tensor:
    """Mean NLL per answer token, over the whole batch."""
    device = next(model.parameters()).device
    seqs, starts = encode(tok, sysp, pairs)
    ids, mask = pad_right(seqs, tok.pad_token_id, device)
    labels = ids.masked_fill(mask == 0, -100)
    for i, s in enumerate(starts):
        labels[i, :s] = -100
    with bf16_compute(model):
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels[:, 1:], ignore_index=-100)


def flat_grad(model, loss: torch.Tensor) -> torch.Tensor:
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float() for g, p in zip(grads, params)])


# --- the run -------------------------------------------------------------------------------------------------


def dream(
    recipe: str | None = None,
    *,
    home: str | os.PathLike | None = None,
    max_minutes: float | None = None,
    max_dreams: int | None = None,
    overrides: dict | None = None,
    show_progress: bool = True,
) -> DreamResult:
    t0 = time.time()
    cfg, _ = load_recipe(recipe, overrides)
    if max_minutes is not None:
        cfg.dream.max_minutes = max_minutes
    if max_dreams is not None:
        cfg.dream.max_dreams = max_dreams
    h = open_home(home)
    with dream_lock(h):
        st = Store(h.db_path)
        try:
            res = _dream(cfg, h, st, t0, Log(h, quiet=not show_progress))
        finally:
            st.close()
    res.wall_s = time.time() - t0
    return res


def _dream(cfg: Recipe, h: Home, st: Store, t0: float, log: Log) -> DreamResult:
    dc, tr = cfg.dream, cfg.training
    deadline = t0 + 60 * dc.max_minutes if dc.max_minutes else math.inf
    current = st.current_adapter_id()
    if current is None:
        return DreamResult(status="nothing", message="nothing to dream about: no adapter yet (run sleepctl seed first)")
    stack = lineage(st, current)
    student_name = stack[-1].base_model
    traces = {t.id: t for t in st.traces(status="consolidated")}
    recent_ids = [i for i in next((a.trace_ids for a in reversed(stack) if a.kind == "seed"), []) if i in traces]
    older = [i for a in stack for i in a.trace_ids if a.kind == "seed" and i in traces and i not in recent_ids]
    if not recent_ids:
        return DreamResult(status="nothing", message="nothing to dream about: the current sleep holds no memories")
    rng = random.Random(f"{tr.seed}:{current}")
    replay_ids = rng.sample(sorted(set(older)), min(len(set(older)), math.ceil(dc.replay_fraction * len(recent_ids))))
    targets = [traces[i] for i in recent_ids + replay_ids]
    probes = st.probes([t.id for t in targets])
    key = {"parent": current}
    resolved = cfg.model_dump()
    # the limits of one night are not part of the work: tomorrow's run with other limits continues it
    resolved["dream"] = {k: v for k, v in resolved["dream"].items() if k not in ("max_minutes", "max_dreams")}
    ids = [t.id for t in targets]
    rf = find_resumable(h, st, "dream", resolved, ids, key) or start_run(h, st, "dream", resolved, ids, key)
    log(
        f"dream run {rf.run.id}: {len(recent_ids)} recent memories, {len(replay_ids)} replayed, on adapter v{stack[-1].version}"
    )
    seed_everything(tr.seed)
    sysp = cfg.data.system_prompt

    def out_of_time() -> bool:
        return time.time() > deadline

    def stopped(phase: str) -> DreamResult:
        st.update_run(rf.run.id, "interrupted", {"stopped_in": phase})
        log(f"time budget reached during {phase}; the current adapter is unchanged; the next run resumes here")
        return DreamResult(
            status="stopped",
            exit_code=EXIT_STOPPED,
            run_id=rf.run.id,
            memories=len(recent_ids),
            replay=len(replay_ids),
            message=f"stopped by --max-minutes during {phase}; run again to continue",
        )

    try:
        # 1. dreams ------------------------------------------------------------------------------------
        dreams = _cached(rf, "dreams.json")
        if dreams is None:
            dreams = _write_dreams(cfg, st, stack, student_name, targets, rng, deadline, log)
            if dreams is None:
                return stopped("dreaming")
            _save(rf, "dreams.json", dreams)
        log(f"{len(dreams)} dreams")
        by_trace = {t.id: t for t in targets}
        model, tok = load_model(student_name, tr.device, cfg.dtype(cfg.student))
        model = add_lora(apply_stack(model, stack), cfg.lora)

        # 2. select by gradient score ------------------------------------------------------------------
        scores = _cached(rf, "scores.json")
        if scores is None:
            scores = {}
            model.train()
            for t in targets:
                g_p = flat_grad(model, sft_loss(model, tok, sysp, reward_pairs(t, probes)))
                for d in (d for d in dreams if d["trace_id"] == t.id):
                    if out_of_time():
                        return stopped("selection")
                    g_d = flat_grad(model, sft_loss(model, tok, sysp, dream_pairs(d, t)))
                    scores[d["id"]] = torch.nn.functional.cosine_similarity(g_d, g_p, dim=0).item()
            _save(rf, "scores.json", scores)
        # The selection is saved: a resumed run must reward and train on the very dreams it kept before.
        by_id = {d["id"]: d for d in dreams}
        kept = [by_id[i] for i in _cached(rf, "kept.json") or []]
        if not kept:
            pick = random.Random(f"{tr.seed}:{current}:keep")
            for t in targets:
                mine = sorted((d for d in dreams if d["trace_id"] == t.id), key=lambda d: -scores.get(d["id"], -1.0))
                top, rest = mine[: dc.top_k], mine[dc.top_k :]
                kept += top + pick.sample(rest, min(dc.random_b, len(rest)))
            _save(rf, "kept.json", [d["id"] for d in kept])
        log(f"kept {len(kept)} dreams by gradient score (top {dc.top_k} + {dc.random_b} random per memory)")

        # 3. reward on an isolated temporary copy of the adapter ---------------------------------------------
        rewards = _cached(rf, "rewards.json")
        if rewards is None:
            rewards = {}
            init = {n: p.detach().clone() for n, p in adapter_state(model).items()}
            for d in kept:
                if out_of_time():
                    return stopped("reward")
                t = by_trace[d["trace_id"]]
                rp = reward_pairs(t, probes)
                with torch.no_grad():
                    before = sft_loss(model, tok, sysp, rp).item()
                opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=dc.inner_lr)
                for _ in range(dc.inner_steps):
                    opt.zero_grad(set_to_none=True)
                    sft_loss(model, tok, sysp, dream_pairs(d, t)).backward()
                    opt.step()
                with torch.no_grad():
                    after = sft_loss(model, tok, sysp, rp).item()
                    for n, p in adapter_state(model).items():
                        p.copy_(init[n])  # back to the untouched adapter
                rewards[d["id"]] = {"reward": int(before - after > dc.reward_margin), "before": before, "after": after}
            _save(rf, "rewards.json", rewards)
        good = [d for d in kept if rewards.get(d["id"], {}).get("reward")]
        log(f"{len(good)} of {len(kept)} kept dreams improved their memory's probe likelihood")

        # 4. ReST-EM on rewarded dreams plus replay --------------------------------------------------------
        data = [pr for d in good for pr in dream_pairs(d, by_trace[d["trace_id"]])]
        data += [restatement_pair(by_trace[i]) for i in replay_ids]
        data += [
            Pair(prompt=p.question, answer=p.answer) for p in probes if p.split == "train" and p.trace_id in replay_ids
        ]
        if not good:
            st.update_run(rf.run.id, "done", {"rewarded": 0})
            return DreamResult(
                status="done",
                message="no dream improved recall; the current adapter is unchanged",
                run_id=rf.run.id,
                memories=len(recent_ids),
                replay=len(replay_ids),
                dreams=len(dreams),
                kept=len(kept),
            )
        opt, sched = make_optimizer(
            model, cfg.optim.model_copy(update={"lr": dc.lr, "warmup_steps": 0}), dc.train_steps
        )
        start = 0
        ckpt = latest_checkpoint(rf)
        if ckpt is not None:
            start = load_checkpoint(ckpt, model, opt, sched).step
            log(f"resuming ReST-EM training at step {start}")
        step = start
        model.train()
        for step in range(start, dc.train_steps):
            if out_of_time():
                log(f"time budget reached at training step {step}: publishing what is trained")
                break
            srng = random.Random(tr.seed * 1_000_003 + step)
            batch = [data[srng.randrange(len(data))] for _ in range(dc.batch_size)]
            loss = sft_loss(model, tok, sysp, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gn = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.optim.grad_clip)
            if torch.isfinite(gn):
                opt.step()
            sched.step()
            rf.metrics.log({"step": step + 1, "loss": loss.item(), "lr": sched.get_last_lr()[0], "time": now()})
            if (step + 1) % dc.checkpoint_every == 0 and step + 1 < dc.train_steps:
                save_checkpoint(rf, step + 1, adapter_state(model), opt, sched, TrainState(step=step + 1, seed=tr.seed))
        else:
            step = dc.train_steps
        if step == 0:
            return stopped("training")

        # 5. publish; current only when nothing got worse -------------------------------------------------------
        heldout = [p for p in probes if p.split == "heldout"]
        recent_p = [p for p in heldout if p.trace_id in set(recent_ids)]
        replay_p = [p for p in heldout if p.trace_id in set(replay_ids)]
        with model.disable_adapter():
            before = {"recall": _recall(model, tok, recent_p, cfg), "retention": _recall(model, tok, replay_p, cfg)}
        after = {"recall": _recall(model, tok, recent_p, cfg), "retention": _recall(model, tok, replay_p, cfg)}
        worse = [k for k in before if before[k] is not None and after[k] < before[k]]
        metrics = {
            "dreams": len(dreams),
            "kept": len(kept),
            "rewarded": len(good),
            "steps": step,
            "before": before,
            "after": after,
        }
        a = publish_adapter(
            h,
            st,
            model,
            run_id=rf.run.id,
            kind="dream",
            base_model=student_name,
            parent_id=current,
            trace_ids=[t.id for t in targets],
            metrics=metrics,
            make_current=not worse,
            mark_consolidated=False,
        )
        st.update_run(
            rf.run.id, "done", {**metrics, "adapter_id": a.id, "adapter_version": a.version, "current": not worse}
        )
        (rf.path / "summary.json").write_text(
            json.dumps({**metrics, "adapter_id": a.id, "current": not worse}, indent=2)
        )
        done = dict(
            run_id=rf.run.id,
            adapter_id=a.id,
            adapter_version=a.version,
            memories=len(recent_ids),
            replay=len(replay_ids),
            dreams=len(dreams),
            kept=len(kept),
            rewarded=len(good),
            steps=step,
            before=before,
            after=after,
        )
        if worse:
            why = ", ".join(f"{k} {100 * before[k]:.0f}% -> {100 * after[k]:.0f}%" for k in worse)
            msg = f"adapter v{a.version} kept but not made current: held-out {why}"
            log(msg)
            return DreamResult(status="not-current", exit_code=EXIT_NOT_CURRENT, message=msg, **done)
        msg = f"dreamt {len(dreams)} dreams, trained on {len(good)}: adapter v{a.version} is current"
        log(msg)
        return DreamResult(status="done", message=msg, made_current=True, **done)
    except KeyboardInterrupt:
        st.update_run(rf.run.id, "interrupted", {})
        raise
    except Exception as e:
        st.update_run(rf.run.id, "failed", {"error": str(e)[:500]})
        log(f"failed: {e}")
        raise


def _write_dreams(
    cfg: Recipe,
    st: Store,
    stack,
    student_name: str,
    targets: list[Trace],
    rng: random.Random,
    deadline: float,
    log: Log,
) -> list[dict[str, Any]] | None:
    """Dreams from the full model and, for a `adapter_dropout` share, from the model without its newest adapter."""
    dc = cfg.dream
    jobs = []
    for t in targets:
        for k in range(dc.dreams_per_memory):
            kind = dc.kinds[k % len(dc.kinds)]
            other = rng.choice([x for x in targets if x.id != t.id]) if kind == "combine" and len(targets) > 1 else None
            if kind == "combine" and other is None:
                kind = "rephrase"
            text = DREAM_PROMPTS[kind].format(m=t.text, m2=other.text if other else "")
            jobs.append(
                {
                    "id": f"d{len(jobs):05d}",
                    "trace_id": t.id,
                    "kind": kind,
                    "prompt": text,
                    "dropout": rng.random() < dc.adapter_dropout,
                }
            )
    if dc.max_dreams:
        jobs = jobs[: dc.max_dreams]
    out = []
    for dropout in (False, True):
        part = [j for j in jobs if j["dropout"] == dropout]
        if not part:
            continue
        model, tok = load_model(student_name, cfg.training.device, cfg.dtype(cfg.student))
        model = apply_stack(model, stack[:-1] if dropout else stack)
        eng = HFEngine(model, tok, cfg.eval.batch_size)
        for i in range(0, len(part), cfg.eval.batch_size):
            if time.time() > deadline:
                return None
            chunk = part[i : i + cfg.eval.batch_size]
            texts = eng.generate(
                [render(tok, cfg.data.system_prompt, j["prompt"]) for j in chunk],
                max_new_tokens=dc.max_new_tokens,
                temperature=dc.temperature,
                seed=rng.randrange(2**31),
            ).texts
            for j, text in zip(chunk, texts):
                if text.strip():
                    out.append({k: v for k, v in j.items() if k != "prompt"} | {"text": text.strip()})
        del model
    return out


@torch.no_grad()
def _recall(model, tok, probes: list[Probe], cfg: Recipe) -> float | None:
    """Held-out contains-match, answered exactly as `eval` answers (greedy, closed-book)."""
    if not probes:
        return None
    outs = answer(model, tok, probes, cfg)
    return sum(contains_match(o, p.answer) for o, p in zip(outs, probes)) / len(probes)


def _cached(rf: RunFolder, name: str):
    p = rf.path / name
    return json.loads(p.read_text()) if p.exists() else None


def _save(rf: RunFolder, name: str, obj) -> None:
    tmp = rf.path / f".{name}.tmp"
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, rf.path / name)
