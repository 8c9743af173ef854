"""Dreaming: the model rehearses its newest memories on data it writes itself (SEAL-style ReST-EM).

    sleepctl dream --max-minutes 30            # nightly, from cron; one job per home at a time, resumable

Read top to bottom. Under the home's lock, for the memories of the newest adapter plus a replay sample
of older ones:
1. dream: the student, memory in its prompt, writes `m` dreams per memory (implications, question-answer
   pairs, rephrasings, combinations of two memories); diversity from temperature and random adapter
   dropout (a share of the dreams is written by the model without its newest adapter);
2. select: score each dream by the cosine between its SFT gradient and the gradient of the memory's
   reward-probe loss, on the newest adapter's parameters; keep the top `k` plus `b` random ones;
3. reward: apply each kept dream to an isolated copy of the adapter for a few SFT steps; reward 1 when
   the memory's reward-probe NLL drops (by `reward_margin`) below the untouched model's. On a GPU steps 2
   and 3 run `parallel` dreams per pass, each through a copy of its own (lora_copies.py);
4. ReST-EM: train the adapter on the rewarded dreams mixed with replay of older memories, through the one
   training loop. The student is both the dreams' generator and the consolidation target;
5. publish: the refined adapter replaces the newest one in the stack (same rank: serving cost does not
   grow) and becomes current only when held-out recall and retention did not get worse and general
   perplexity rose by no more than `ppl_tolerance`.
Reward probes are the teacher's train-split probes (or, where a memory has none, its restatement);
the held-out probes that decide step 5 are never used for the reward. Each phase writes its result to
the run folder, so a killed or time-limited run continues where it stopped. When the stack has grown
past `consolidate.max_adapters`, a consolidation follows (consolidate.py).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import time
from typing import Any

import torch
from pydantic import BaseModel
from rich.console import Console

from . import distributed
from .adapters import NEW, lineage, publish_adapter, read_lora, stack_lora
from .anchor import AnchorText
from .corrections import TakenBack, corrected, states_corrected
from .data import context, later, link
from .display import plain
from .engines import HFEngine, lora_capacity, release_engines, rollout_engine
from .evaluate import answer, job_recipe, perplexity
from .general_text import reference_paragraphs
from .grounding import grounded, invented
from .home import Home, open_home, sleep_lock, write_atomic
from .loop import train
from .lora_copies import LoraCopies
from .models import load_model, resolve
from .objectives import Pair, SFTObjective, group_nll
from .prompts import entities, render, restatement
from .recipe import Dream as DreamConfig
from .recipe import Lora, Recipe
from .records import Adapter, Probe, Trace
from .runs import (
    RunFolder,
    find_resumable,
    latest_checkpoint,
    load_checkpoint,
    run_status,
    seed_everything,
    start_run,
    sweep,
)
from .scoring import SCORING_VERSION, recalled, token_f1
from .store import Store, now
from .training import add_lora, make_optimizer

err = Console(stderr=True)

# Exit codes beside the common ones (README): the run finished but its adapter is not current, or the
# time budget ran out before training (the next run resumes).
EXIT_NOT_CURRENT = 3
EXIT_STOPPED = 4

KEEP = "Keep every name, number and date exactly as written."
NEWER_WINS = "Where these notes disagree, the most recent one is true: it replaced the older one."
DREAM_PROMPTS = {
    "implication": "Here is something you remember:\n\n{m}\n\nWrite two or three sentences on what follows from it: "
    "consequences, who is affected, what happens next. " + KEEP,
    "qa": "Here is something you remember:\n\n{m}\n\nWrite three questions about it, each followed by its answer "
    "in one full sentence, in the form 'Q: ... A: ...'. " + KEEP,
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
    invented: int = 0  # dreams dropped as not grounded: a name or value their memories lack, or mostly other words
    rewarded: int = 0
    steps: int = 0
    before: dict[str, float | None] = {}
    after: dict[str, float | None] = {}
    consolidation: dict[str, Any] | None = None
    phases_s: dict[str, float] = {}  # seconds per phase in this run (a resumed run's saved phases take ~0)
    wall_s: float = 0.0


# --- log -------------------------------------------------------------------------------------------------


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
            err.print(plain(msg, "dim"))  # messages name models and adapters: plain text, never markup


# --- data ----------------------------------------------------------------------------------------------


def newer_related(targets: list[Trace], everyone: list[Trace], max_related: int) -> dict[str, list[Trace]]:
    """Per memory, the later memories about the same things: any of them may have changed one of its facts."""
    links = link(targets, everyone, max_related)
    return {t.id: newer for t in targets if (newer := later(t, links.get(t.id, [])))}


def dream_memory(t: Trace, newer: list[Trace]) -> str:
    """What a dream about `t` is written from. Its text alone holds a value a later memory may have corrected
    ("the standup moved to 10:05"), and a dream of it would rehearse the stale one; so the later memories come
    with it, dated, and the most recent wins, as the seed's teacher sees them."""
    if not newer:
        return t.text
    notes = "\n\n".join(f"[recorded {when}]\n{text.strip()}" for when, text in context(t, {t.id: newer}))
    return f"{notes}\n\n{NEWER_WINS}"


def dream_jobs(
    cfg: Recipe, targets: list[Trace], newer: dict[str, list[Trace]], rng: random.Random
) -> list[dict[str, Any]]:
    """The dreams to write: `dreams_per_memory` per memory, cycling through the recipe's kinds.

    A combination joins two memories that share a name (as `replay.max_related` links them; 0: none do). Two unrelated ones drawn at random taught false links:
    on the real pair a kept dream read "The Lanternfish analytics service will use DuckDB; Dana Okafor approved
    the slip" (Dana approved another memory's delay), and after the dream "Who approved the Quokka decision?" was
    answered "Dana Okafor". A memory with no such partner gets a rephrasing instead."""
    dc = cfg.dream
    partners = link(targets, targets, cfg.replay.max_related) if "combine" in dc.kinds else {}
    jobs = []
    for t in targets:
        for k in range(dc.dreams_per_memory):
            kind = dc.kinds[k % len(dc.kinds)]
            mates = [x for x in partners.get(t.id, []) if x.id != t.id]
            other = rng.choice(mates) if kind == "combine" and mates else None
            if kind == "combine" and other is None:
                kind = "rephrase"
            m = dream_memory(t, newer.get(t.id, []))
            m2 = dream_memory(other, newer.get(other.id, [])) if other else ""
            jobs.append(
                {
                    "id": f"d{len(jobs):05d}",
                    "trace_id": t.id,
                    "kind": kind,
                    "prompt": DREAM_PROMPTS[kind].format(m=m, m2=m2),
                    "source": f"{m}\n\n{m2}" if m2 else m,  # what the dream may state
                    # and what it must not: a value its chat (or its partner's) took back
                    "taken_back": {v: tb for x in (t, other) if x for v, tb in corrected(x).items()},
                    "partner_id": other.id if other else None,
                    "dropout": rng.random() < dc.adapter_dropout,
                }
            )
    return jobs


def replay_pairs(replayed: list[Trace], probes: list[Probe], newer: dict[str, list[Trace]]) -> list[Pair]:
    """Older memories rehearsed beside the dreams: their train probes (superseded ones are already out) and
    their restatement, except where a later memory touches them: their own text may hold a corrected value."""
    ids = {t.id for t in replayed}
    pairs = [restatement_pair(t) for t in replayed if t.id not in newer]
    return pairs + [
        Pair(prompt=p.question, answer=p.answer) for p in probes if p.split == "train" and p.trace_id in ids
    ]


def restatement_pair(t: Trace) -> Pair:
    names = entities(t.text, 1)
    return Pair(
        prompt=f"What do you remember about {names[0]}?" if names else "What do you remember?", answer=restatement(t)
    )


def select_dreams(
    mine: list[dict[str, Any]], scores: dict[str, float], top_k: int, random_b: int, max_overlap: float, rng
) -> list[dict[str, Any]]:
    """One memory's dreams to reward: the `top_k` by gradient score, then `random_b` of the rest at random.

    The diversity guard: a dream whose words overlap one already kept by more than `max_overlap` (token F1) is
    passed over, so selection by score cannot fill a memory's places with near-copies of one phrasing (self-edits
    chosen by reward collapse in diversity, SPA reports). Fewer are kept when too few distinct ones exist.
    """
    ranked = sorted(mine, key=lambda d: -scores.get(d["id"], -1.0))
    kept: list[dict[str, Any]] = []

    def take(candidates: list[dict[str, Any]], n: int) -> None:
        for d in candidates:
            if n <= 0:
                return
            if all(token_f1(d["text"], k["text"]) <= max_overlap for k in kept):
                kept.append(d)
                n -= 1

    take(ranked, top_k)
    rest = [d for d in ranked if d not in kept]
    take(rng.sample(rest, len(rest)), random_b)
    return kept


def qa_pairs(text: str) -> list[tuple[str, str]]:
    """The 'Q: ... A: ...' pairs of a QA dream: each trains as a prompt and its answer, like a teacher question."""
    found = re.findall(r"Q:\s*(.+?)\s*A:\s*(.+?)(?=\s*Q:|\Z)", text, flags=re.S)
    return [(q.strip(), a.strip()) for q, a in found if q.strip() and a.strip()]


def whole_part(kind: str, text: str) -> str:
    """What of a dream cut off by the token limit may train: the question-answer pairs before the one it was writing,
    or its text up to the last whole sentence ("" when there is none).

    On the real pair at 64 tokens, 22 of the 31 QA dreams a night kept and 12 of its 16 implications ended mid-
    sentence ("A: The Corvina data pipeline is expected to run at 02", "... at 3 pm in room"), each trained as if
    the answer ended there; after that dream the adapter answered "At what time does the Corvina data pipeline run
    now?" with "It runs at 02" and put the one-on-ones "in room", both right before it.
    """
    if kind == "qa":
        i = text.rfind("Q:")
        head = text[:i].rstrip() if i > 0 else ""
        return head if qa_pairs(head) else ""
    for end in reversed(list(_SENTENCE_END.finditer(text))):
        if not _LIST_NUMBER.search(text, 0, end.start()):  # "...weekends.\n2." ends on a list item's number
            return text[: end.end()]
    return ""


# a stop that ends a sentence: followed by a capital, a digit or the end of the text, and not a title's ("Dr.
# Albright"), an initial's ("Fenna J. Albright") or, at the end of a cut text, a number's ("firmware 3.")
_SENTENCE_END = re.compile(
    r"(?<!\b[A-Z])(?<!\bDr)(?<!\bMr)(?<!\bMrs)(?<!\bMs)(?<!\bSt)(?<!\bProf)(?<!\bJr)(?<!\bvs)(?<!\betc)(?<!\be\.g)"
    r"(?<!\bi\.e)[.!?][\"')\]\u201d\u2019]*(?:(?=\s+[\"'\u201c\u2018(\[]?[A-Z0-9])|(?<!\d[.!?])\Z)"
)
_LIST_NUMBER = re.compile(r"(?:^|\n)\s*\d+$")


def grounded_dream(kind: str, text: str, source: str, taken_back: dict[str, TakenBack] | None = None) -> dict[str, Any]:
    """What of a dream may train, judged as the seed judges teacher answers: `invented` (names and values its
    memories lack: the dream is dropped), `grounded` (False: dropped too) and, for a QA dream, the `pairs` that pass.

    A QA dream keeps the pairs whose answer is mostly its memories' words and whose question and answer state nothing
    they lack; it is dropped only when none is left. A rephrasing or combination must be mostly its memories' words.
    An implication says what follows in its own words, so only what it states is checked. Unchecked, a night on the
    real pair kept "Q: Where are the one-on-ones taking place? A: Thirteen different locations.", answers cut off
    by the token limit ("A: The", "A: They") and "Yes, both were remembered.", and the dreamt adapter then answered
    "Thirteen different rooms." for the room it knew before. `taken_back`: values the chat itself corrected
    (`corrections.corrected`), which a dream or a pair must not state without their replacement either."""
    taken_back = taken_back or {}
    pairs = qa_pairs(text) if kind == "qa" else []
    if pairs:
        good = [
            [q, a]
            for q, a in pairs
            if grounded(a, source) and not invented(f"{q}\n{a}", source) and not states_corrected(a, taken_back)
        ]
        made_up = [] if good else invented(text, source)
        return {
            "invented": made_up,
            "grounded": bool(good),
            "pairs": good,
            "pairs_dropped": len(pairs) - len(good),
            "taken_back": [] if good else states_corrected(text, taken_back),
        }
    return {
        "invented": invented(text, source),
        "grounded": kind == "implication" or grounded(text, source),
        "taken_back": states_corrected(text, taken_back),
    }


def dream_pairs(dream: dict[str, Any], t: Trace) -> list[Pair]:
    """A QA dream trains as its question-answer pairs (the ones that passed, where they were checked); any other
    dream as the answer to 'what do you remember about X?', the question a restatement answers."""
    if dream.get("pairs"):
        return [Pair(prompt=q, answer=a) for q, a in dream["pairs"]]
    if dream["kind"] == "qa" and (pairs := qa_pairs(dream["text"])):
        return [Pair(prompt=q, answer=a) for q, a in pairs]
    return [Pair(prompt=restatement_pair(t).prompt, answer=dream["text"])]


def reward_pairs(t: Trace, probes: list[Probe]) -> list[Pair]:
    train = [Pair(prompt=p.question, answer=p.answer) for p in probes if p.trace_id == t.id and p.split == "train"]
    return train or [restatement_pair(t)]


def _rows(groups: list[list[Pair]]) -> list[int]:
    """The copy of each row of a batch of groups: group j's pairs run through copy j."""
    return [j for j, g in enumerate(groups) for _ in g]


def _copy_grads(model, tok, sysp: str, copies: LoraCopies, groups: list[list[Pair]]) -> tuple[torch.Tensor, ...]:
    """Per LoRA tensor, [copies, ...]: group j's SFT gradient in copy j (a zero delta: the adapter's own)."""
    with copies.active(_rows(groups)):
        return copies.grad(group_nll(model, tok, sysp, groups).sum())


def dream_scores(
    model, tok, sysp: str, targets: list[Trace], dreams: list[dict[str, Any]], probes: list[Probe], n: int, out_of_time
) -> dict[str, float] | None:
    """Each dream's cosine between its SFT gradient and its memory's reward-probe gradient, on the newest
    adapter's parameters, `n` gradients a backward pass (one per copy of the adapter). Memories go in blocks
    whose dreams fill a pass: one pass for the block's probe sets, then its dreams; probe sets and dreams are
    kept apart because a short probe answer padded to a dream's length is wasted work. None: out of time."""
    copies = LoraCopies(model, n)
    mine = [(t, ds) for t in targets if (ds := [d for d in dreams if d["trace_id"] == t.id])]
    scores: dict[str, float] = {}
    i = 0
    while i < len(mine):
        block, size = [mine[i]], len(mine[i][1])
        i += 1
        while i < len(mine) and len(block) < n and size + len(mine[i][1]) <= n:
            block.append(mine[i])
            size += len(mine[i][1])
            i += 1
        if out_of_time():
            return None
        g_p = _copy_grads(model, tok, sysp, copies, [reward_pairs(t, probes) for t, _ in block])
        todo = [(j, d, t) for j, (t, ds) in enumerate(block) for d in ds]
        for k in range(0, len(todo), n):
            if out_of_time():
                return None
            part = todo[k : k + n]
            g_d = _copy_grads(model, tok, sysp, copies, [dream_pairs(d, t) for _, d, t in part])
            mem = torch.tensor([j for j, _, _ in part], device=g_p[0].device)
            rows = [
                (d[: len(part)].reshape(len(part), -1).double(), p[mem].reshape(len(part), -1).double())
                for d, p in zip(g_d, g_p)
            ]
            dot = sum((d * p).sum(1) for d, p in rows)
            norm_d = sum(d.pow(2).sum(1) for d, _ in rows).sqrt().clamp(min=1e-8)
            norm_p = sum(p.pow(2).sum(1) for _, p in rows).sqrt().clamp(min=1e-8)
            for (_, d, _), c in zip(part, (dot / (norm_d * norm_p)).tolist()):
                scores[d["id"]] = c
    return scores


def dream_rewards(
    model,
    tok,
    sysp: str,
    kept: list[dict[str, Any]],
    by_trace: dict[str, Trace],
    probes: list[Probe],
    dc: DreamConfig,
    n: int,
    out_of_time,
) -> dict[str, dict[str, float]] | None:
    """Reward 1 for a dream when `inner_steps` SGD steps on it alone lower its memory's reward-probe NLL by more
    than `reward_margin`. Each dream trains its own copy of the adapter, `n` dreams at a time; the adapter
    ends as it began. Before and after are measured on the same batch of probe sets, so only the
    dream's steps separate them (in bf16, a batch of another shape rounds differently); a batch seen before
    (one memory's, one dream at a time) is not measured again. None: out of time."""
    copies = LoraCopies(model, n)
    untouched: dict[tuple[str, ...], list[float]] = {}
    rewards: dict[str, dict[str, float]] = {}
    for i in range(0, len(kept), n):
        if out_of_time():
            return None
        chunk = kept[i : i + n]
        ts = [by_trace[d["trace_id"]] for d in chunk]
        groups = [dream_pairs(d, t) for d, t in zip(chunk, ts)]
        probe_sets = [reward_pairs(t, probes) for t in ts]
        key = tuple(t.id for t in ts)
        if key not in untouched:
            with torch.no_grad(), copies.active(_rows(probe_sets)):
                untouched[key] = group_nll(model, tok, sysp, probe_sets).tolist()
        for _ in range(dc.inner_steps):
            copies.sgd_step(_copy_grads(model, tok, sysp, copies, groups), dc.inner_lr)
        with torch.no_grad(), copies.active(_rows(probe_sets)):
            after = group_nll(model, tok, sysp, probe_sets).tolist()
        copies.reset()  # before anything returns: a single copy is the adapter itself
        for d, b, a in zip(chunk, untouched[key], after):
            rewards[d["id"]] = {"reward": int(b - a > dc.reward_margin), "before": b, "after": a}
    return rewards


# --- the run -------------------------------------------------------------------------------------------------


def dream(
    recipe: str | None = None,
    *,
    home: str | os.PathLike | None = None,
    max_minutes: float | None = None,
    max_dreams: int | None = None,
    overrides: dict | None = None,
    show_progress: bool = True,
    consolidate: bool | None = None,
    keep_engines: bool = False,
) -> DreamResult:
    """Rehearse the newest adapter's memories. `consolidate` (default: the recipe's `consolidate.auto`):
    consolidate the stack afterwards when it has grown past `consolidate.max_adapters`."""
    distributed.refuse("dream")  # one process: only seed trains across several
    t0 = time.time()
    h = open_home(home)
    with Store(h.db_path) as st:
        cfg = job_recipe(st, recipe, overrides)  # the newest adapter's own recipe unless one is named
    if max_minutes is not None:
        cfg.dream.max_minutes = max_minutes
    if max_dreams is not None:
        cfg.dream.max_dreams = max_dreams
    log = Log(h, quiet=not show_progress)
    try:
        with sleep_lock(h, "dream"):
            st = Store(h.db_path)
            try:
                sweep(h, st)  # what a job that died left behind
                res = _dream(cfg, h, st, t0, log)
                auto = cfg.consolidate.auto if consolidate is None else consolidate
                if auto and res.made_current:
                    from .consolidate import consolidate_locked

                    c = consolidate_locked(cfg, h, st, if_needed=True, show_progress=show_progress)
                    if c.status != "nothing":
                        res.consolidation = c.model_dump()
                        log(c.message)
            finally:
                st.close()
    finally:
        if not keep_engines:
            release_engines()
    res.wall_s = time.time() - t0
    return res


def adapter_lora(a: Adapter) -> Lora:
    """The LoRA shape of a saved adapter, so the dream refines it in place (same rank, same modules)."""
    cfg = read_lora(a.path)[1]
    t = cfg.get("target_modules") or []
    return Lora(r=cfg["r"], alpha=cfg["lora_alpha"], dropout=0.0, target_modules=[t] if isinstance(t, str) else list(t))


def _dream(cfg: Recipe, h: Home, st: Store, t0: float, log: Log) -> DreamResult:
    dc, tr = cfg.dream, cfg.training
    deadline = t0 + 60 * dc.max_minutes if dc.max_minutes else math.inf
    current = st.current_adapter_id()
    if current is None:
        return DreamResult(status="nothing", message="nothing to dream about: no adapter yet (run sleepctl seed first)")
    stack = lineage(st, current)
    newest, under = stack[-1], stack[:-1]
    student_name = newest.base_model
    traces = {t.id: t for t in st.traces(status="consolidated")}
    recent_ids = [i for i in newest.trace_ids if i in traces]
    older = sorted({i for a in under for i in a.trace_ids if i in traces and i not in set(recent_ids)})
    if not recent_ids:
        return DreamResult(status="nothing", message="nothing to dream about: the current sleep holds no memories")
    # Keyed on what tonight holds, not on the adapter's id (time and random bits): the same memories and
    # seed draw the same dreams, replay and selection in any home, so a dream can be reproduced.
    night = (
        f"{tr.seed}:v{newest.version}:"
        + hashlib.sha256("".join(sorted(traces[i].hash for i in recent_ids)).encode()).hexdigest()[:16]
    )
    rng = random.Random(night)
    replay_ids = rng.sample(older, min(len(older), math.ceil(dc.replay_fraction * len(recent_ids))))
    targets = [traces[i] for i in recent_ids + replay_ids]
    newer = newer_related(targets, list(traces.values()), cfg.replay.max_related)
    probes = [p for p in st.probes([t.id for t in targets]) if p.superseded_by is None]
    key = {"parent": current}
    resolved = cfg.model_dump()
    # the limits of one night are not part of the work: tomorrow's run with other limits continues it
    # nor is how many dreams share a pass (`parallel`, lowered when memory runs short), nor the gate's tolerance
    # (it only decides what is made current; and a run saved before the field existed still resumes)
    off = ("max_minutes", "max_dreams", "parallel", "ppl_tolerance")
    resolved["dream"] = {k: v for k, v in resolved["dream"].items() if k not in off}
    ids = [t.id for t in targets]
    rf = find_resumable(h, st, "dream", resolved, ids, key) or start_run(h, st, "dream", resolved, ids, key)
    log(
        f"dream run {rf.run.id}: {len(recent_ids)} recent memories, {len(replay_ids)} replayed, on adapter v{newest.version}"
    )
    seed_everything(tr.seed)
    sysp = cfg.data.system_prompt
    phases: dict[str, float] = {}
    mark = [time.time()]

    def lap(phase: str) -> None:
        """Close `phase`: where a night's dream spends its time is what makes it shorter."""
        t = time.time()
        phases[phase] = phases.get(phase, 0.0) + t - mark[0]
        mark[0] = t

    def out_of_time() -> bool:
        return time.time() > deadline

    made_up: list[dict[str, Any]] = []  # dreams dropped as made up, once written: a stopped run reports them too

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
            phases_s=phases,
            invented=len(made_up),
        )

    with run_status(st, rf):
        # The newest adapter is refined in place: the trainable adapter starts from its weights, over the rest.
        base, tok = load_model(student_name, tr.device, cfg.dtype(cfg.student))
        model = add_lora(base, adapter_lora(newest), under, fused=tr.fused_lora)
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, read_lora(newest.path)[0], adapter_name=NEW)
        eng = None
        if cfg.engine == "vllm":
            eng = rollout_engine(cfg, model, tok, resolve(student_name).path, lora_capacity(cfg, len(under)), h)
            eng.frozen = stack_lora(under)
        lap("load")
        # a GPU steps a batch of copies in about the time of one (kernel launches); a CPU pays for every row,
        # the padding of the longest and the copies' hooks
        copies_per_pass = dc.parallel or (8 if next(model.parameters()).device.type == "cuda" else 1)

        # 1. dreams ------------------------------------------------------------------------------------
        dreams = _cached(rf, "dreams.json")
        if dreams is None:
            dreams = _write_dreams(cfg, model, tok, eng, under, targets, newer, rng, deadline)
            if dreams is None:
                return stopped("dreaming")
            _save(rf, "dreams.json", dreams)
        lap("write")
        log(f"{len(dreams)} dreams")
        if cut := sum(bool(d.get("cut")) for d in dreams):
            empty = sum(not d["text"] for d in dreams)
            log(
                f"{cut} of them reached the token limit (dream.max_new_tokens {dc.max_new_tokens})"
                + (
                    f": each trains up to its last whole sentence or question-answer pair, {empty} with none are left out"
                    if dc.grounded
                    else ""
                )
            )
        # a dream is the model's own writing: one that names a person or value its memories do not would train it
        # in, and so would one mostly in other words (or, for QA, with no answer that is not)
        made_up = [
            d
            for d in dreams
            if dc.grounded and (d.get("invented") or d.get("grounded") is False or d.get("taken_back"))
        ]
        dropped = {d["id"] for d in made_up}
        usable = [d for d in dreams if d["id"] not in dropped and d["text"]]
        if made_up:
            names = sorted({x for d in made_up for x in d["invented"]})[:3]
            log(
                f"{len(made_up)} of {len(dreams)} dreams are not grounded in their memories, not used: "
                f"{sum(bool(d['invented']) for d in made_up)} state a name or value their memories do not hold"
                + (f" (e.g. {', '.join(names)})" if names else "")
                + (
                    f", {n} repeat what their chat later corrected"
                    if (n := sum(bool(d.get("taken_back")) for d in made_up))
                    else ""
                )
                + f", {sum(not d['invented'] and not d.get('taken_back') for d in made_up)} say mostly other things"
            )
        if cut := sum(d.get("pairs_dropped", 0) for d in usable):
            log(f"{cut} question-answer pairs left out of the QA dreams kept, for the same reasons")
        by_trace = {t.id: t for t in targets}

        # the gate's "before": the stack as it is, measured before any training (saved for a resumed run)
        heldout = [p for p in probes if p.split == "heldout"]
        recent_p = [p for p in heldout if p.trace_id in set(recent_ids)]
        replay_p = [p for p in heldout if p.trace_id in set(replay_ids)]
        before = _cached(rf, "before.json")
        if before is None or before.get("scoring") != SCORING_VERSION:  # scored otherwise: not comparable
            before = _gate_recall(model, tok, recent_p, replay_p, cfg, eng, version=-2)
            before["scoring"] = SCORING_VERSION
            _save(rf, "before.json", before)
        lap("gate_before")

        # 2. select by gradient score ------------------------------------------------------------------
        scores = _cached(rf, "scores.json")
        if scores is None:
            model.train()
            scores = dream_scores(model, tok, sysp, targets, usable, probes, copies_per_pass, out_of_time)
            if scores is None:
                return stopped("selection")
            _save(rf, "scores.json", scores)
        # The selection is saved: a resumed run must reward and train on the very dreams it kept before.
        by_id = {d["id"]: d for d in dreams}
        kept = [by_id[i] for i in _cached(rf, "kept.json") or []]
        if not kept:
            pick = random.Random(f"{night}:keep")
            for t in targets:
                mine = [d for d in usable if d["trace_id"] == t.id]
                kept += select_dreams(mine, scores, dc.top_k, dc.random_b, dc.max_overlap, pick)
            _save(rf, "kept.json", [d["id"] for d in kept])
        lap("select")
        log(
            f"kept {len(kept)} dreams by gradient score (top {dc.top_k} + {dc.random_b} random per memory, "
            f"none sharing more than {dc.max_overlap:.0%} of its words with another kept for the same memory)"
        )

        # 3. reward on an isolated temporary copy of the adapter ---------------------------------------------
        rewards = _cached(rf, "rewards.json")
        if rewards is None:
            rewards = dream_rewards(model, tok, sysp, kept, by_trace, probes, dc, copies_per_pass, out_of_time)
            if rewards is None:
                return stopped("reward")
            _save(rf, "rewards.json", rewards)
        lap("reward")
        good = [d for d in kept if rewards.get(d["id"], {}).get("reward")]
        log(f"{len(good)} of {len(kept)} kept dreams improved their memory's probe likelihood")

        # 4. ReST-EM on rewarded dreams plus replay, through the one training loop -------------------------
        data = [pr for d in good for pr in dream_pairs(d, by_trace[d["trace_id"]])]
        data += replay_pairs([by_trace[i] for i in replay_ids], probes, newer)
        if not good:
            st.update_run(rf.run.id, "done", {"rewarded": 0})
            return DreamResult(
                status="done",
                message=(
                    "no dream improved recall; the current adapter is unchanged"
                    if usable
                    else f"no dream ({len(dreams)}) was grounded in its memories (names, values or words they do not hold) "
                    "and whole (not cut off by dream.max_new_tokens); the current adapter is unchanged"
                ),
                run_id=rf.run.id,
                memories=len(recent_ids),
                replay=len(replay_ids),
                dreams=len(dreams),
                invented=len(made_up),
                kept=len(kept),
                phases_s=phases,
            )
        opt, sched = make_optimizer(
            model, cfg.optim.model_copy(update={"lr": dc.lr, "warmup_steps": 0}), dc.train_steps
        )
        start = 0
        ckpt = latest_checkpoint(rf)
        if ckpt is not None:
            start = load_checkpoint(ckpt, model, opt, sched).step
            log(f"resuming ReST-EM training at step {start}")
        anchor = AnchorText(tok, cfg) if cfg.anchor.kl_coef > 0 else None
        loop = train(
            model,
            lambda step, r: [data[r.randrange(len(data))] for _ in range(dc.batch_size)],
            SFTObjective(model, tok, sysp, anchor, cfg.anchor.kl_coef),
            opt,
            sched,
            max_steps=dc.train_steps,
            seed=tr.seed,
            grad_clip=cfg.optim.grad_clip,
            start=start,
            rf=rf,
            checkpoint_every=dc.checkpoint_every,
            deadline=deadline,
            label="dream",
        )
        step = loop.completed
        lap("train")
        if loop.stopped:
            log(f"time budget reached at training step {step}: publishing what is trained")
        if step == 0:
            return stopped("training")

        # 5. publish; current only when nothing got worse -------------------------------------------------------
        after = _gate_recall(model, tok, recent_p, replay_p, cfg, eng, version=step)
        lap("gate_after")
        worse = gate_worse(before, after, dc.ppl_tolerance)
        metrics = {
            "dreams": len(dreams),
            "invented": len(made_up),
            "kept": len(kept),
            "rewarded": len(good),
            "steps": step,
            "before": before,
            "after": after,
            "phases_s": phases,
        }
        a = publish_adapter(
            h,
            st,
            model,
            run_id=rf.run.id,
            kind="dream",
            base_model=student_name,
            parent_id=newest.parent_id,
            replaces=newest.id,
            trace_ids=newest.trace_ids,
            metrics=metrics,
            make_current=not worse,
            expect_current=current,
        )
        st.update_run(
            rf.run.id, "done", {**metrics, "adapter_id": a.id, "adapter_version": a.version, "current": a.current}
        )
        (rf.path / "summary.json").write_text(
            json.dumps({**metrics, "adapter_id": a.id, "current": a.current}, indent=2)
        )
        done = dict(
            run_id=rf.run.id,
            adapter_id=a.id,
            adapter_version=a.version,
            memories=len(recent_ids),
            replay=len(replay_ids),
            dreams=len(dreams),
            invented=len(made_up),
            kept=len(kept),
            rewarded=len(good),
            steps=step,
            before=before,
            after=after,
            phases_s=phases,
        )
        if not a.current:
            why = ", ".join(worse) if worse else "the current adapter changed while it trained"
            msg = f"adapter v{a.version} kept but not made current: {why}"
            log(msg)
            return DreamResult(status="not-current", exit_code=EXIT_NOT_CURRENT, message=msg, **done)
        msg = f"dreamt {len(dreams)} dreams, trained on {len(good)}: adapter v{a.version} is current"
        log(msg)
        return DreamResult(status="done", message=msg, made_current=True, **done)


def _write_dreams(
    cfg: Recipe,
    model,
    tok,
    eng,
    under: list[Adapter],
    targets: list[Trace],
    newer: dict[str, list[Trace]],
    rng: random.Random,
    deadline: float,
) -> list[dict[str, Any]] | None:
    """Dreams from the full model and, for an `adapter_dropout` share, from the model without its newest adapter."""
    from .adapters import STACK, active

    dc = cfg.dream
    jobs = dream_jobs(cfg, targets, newer, rng)
    if dc.max_dreams:
        jobs = jobs[: dc.max_dreams]
    out = []
    bs = len(jobs) if eng is not None else cfg.eval.batch_size  # vLLM takes them all at once
    for dropout in (False, True):
        part = [j for j in jobs if j["dropout"] == dropout]
        if not part:
            continue
        if eng is not None:
            if dropout:
                eng.serve(stack_lora(under), key=None)
            else:
                eng.sync(model, version=-3)
            sampler, ctx = eng, _null()
        else:
            sampler = HFEngine(model, tok, cfg.eval.batch_size)
            ctx = (active(model, [STACK]) if under else model.disable_adapter()) if dropout else _null()
        with ctx:
            for i in range(0, len(part), bs):
                if time.time() > deadline:
                    return None
                chunk = part[i : i + bs]
                ro = sampler.generate(
                    [render(tok, cfg.data.system_prompt, j["prompt"]) for j in chunk],
                    max_new_tokens=dc.max_new_tokens,
                    temperature=dc.temperature,
                    seed=rng.randrange(2**31),
                )
                for j, text, ids in zip(chunk, ro.texts, ro.completion_ids):
                    job = {k: v for k, v in j.items() if k not in ("prompt", "source", "taken_back")}
                    cut = len(ids) >= dc.max_new_tokens and ids[-1] != tok.eos_token_id
                    text = whole_part(j["kind"], text.strip()) if cut and dc.grounded else text.strip()
                    if text:
                        said = {"text": text, "invented": invented(text, j["source"]), "cut": cut}
                        if dc.grounded:
                            said |= grounded_dream(j["kind"], text, j["source"], j.get("taken_back"))
                        out.append(job | said)
                    elif cut and dc.grounded:  # kept in the record, so the log can count it; nothing of it trains
                        out.append(job | {"text": "", "invented": [], "cut": True})
    return out


def _null():
    from contextlib import nullcontext

    return nullcontext()


def _gate_recall(model, tok, recent_p, replay_p, cfg: Recipe, eng, version: int) -> dict[str, float | None]:
    """Held-out recall of the recent memories, retention of the replayed ones and general perplexity, as the model
    is now. Perplexity because recall alone let through a dream that changed no answer and took the CPU demo's
    drift from +47% to +126%."""
    if eng is not None:
        eng.sync(model, version=version)
    was = model.training
    model.eval()
    try:
        ppl = perplexity(model, tok, reference_paragraphs(cfg.eval.ppl_paragraphs))
    finally:
        model.train(was)
    return {
        "recall": _recall(model, tok, recent_p, cfg, eng),
        "retention": _recall(model, tok, replay_p, cfg, eng),
        "ppl": ppl,
    }


def gate_worse(before: dict[str, float | None], after: dict[str, float | None], ppl_tolerance: float) -> list[str]:
    """What got worse from before to after: recall or retention lower, or perplexity up by more than the tolerance
    (a gate measured before perplexity was part of it has none: that check is skipped)."""
    worse = [
        f"held-out {k} {100 * before[k]:.0f}% -> {100 * after[k]:.0f}%"
        for k in ("recall", "retention")
        if before.get(k) is not None and after.get(k) is not None and after[k] < before[k]
    ]
    b, a = before.get("ppl"), after.get("ppl")
    if b and a is not None and (not math.isfinite(a) or a > b * (1 + ppl_tolerance)):  # a NaN is worse, not equal
        worse.append(f"general perplexity {b:.2f} -> {a:.2f}")
    return worse


@torch.no_grad()
def _recall(model, tok, probes: list[Probe], cfg: Recipe, eng=None) -> float | None:
    """Held-out recall, answered and scored exactly as `eval` does (greedy, closed-book, `recalled`)."""
    if not probes:
        return None
    outs = answer(model, tok, probes, cfg, engine=eng)
    return sum(recalled(o, p.answer, p.question, p.origin) for o, p in zip(outs, probes)) / len(probes)


def _cached(rf: RunFolder, name: str):
    p = rf.path / name
    return json.loads(p.read_text()) if p.exists() else None


def _save(rf: RunFolder, name: str, obj) -> None:
    write_atomic(rf.path / name, json.dumps(obj))
