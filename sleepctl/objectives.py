"""What one optimizer step minimises: the seed objective (seed and consolidation) and plain SFT (dream, baseline).

Seed, per step (DESIGN.md, "Knowledge Seeding"):

    loss = alpha * GKD + (1 - alpha) * LTI  [+ kl_coef * KL(base || student) on general text]

GKD: per-token D(teacher(.|c,x,y<t) || student(.|x,y<t)) on the teacher's cached answers, or with
probability lmbda (ramped up from 0) on the student's own samples; c is the memory, with the memories
related to it in time order. LTI: the student continues a random prefix of a teacher answer; reward
gamma*r_sem + (1-gamma)*r_abs; group-relative advantages. The anchor keeps general text where the base
had it. Rollouts come first, from one weight version; `steps_per_generation` > 1 samples the rollouts of
that many steps in one engine call (staleness up to n-1 updates).
"""

from __future__ import annotations

import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from . import judge
from .data import Example
from .losses import abs_reward, divergence, group_advantages, lti_reward, policy_gradient_loss, sequence_logps
from .prompts import Memory, render
from .recipe import Recipe
from .training import bf16_compute, completion_logits, labels_tensor, pad_right


def encode_answer(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


@dataclass
class Plan:
    """One step's random choices, drawn before any sampling so several steps can be sampled at once."""

    on_policy: bool
    gen_seed: int | None = None
    ys: list[list[int]] | None = None  # off-policy: the teacher answers to score
    lti_prompts: list[str] = field(default_factory=list)
    lti_targets: list[str] = field(default_factory=list)
    lti_seed: int | None = None


@dataclass
class Sampled:
    ys: list[list[int]] | None = None
    lti_prompt_ids: list[list[int]] | None = None
    lti_completions: list[list[int]] | None = None
    lti_texts: list[str] | None = None
    tokens: int = 0
    seconds: float = 0.0


class SeedObjective:
    def __init__(
        self,
        model,
        teacher,
        s_tok,
        t_tok,
        engine,
        cfg: Recipe,
        contexts: dict[str, list[Memory]],
        batches,
        anchor=None,
        max_steps: int | None = None,
        extra_teacher: tuple | None = None,
        forward=None,
    ):
        """`extra_teacher`: (context manager factory that makes the model that teacher, weight), e.g. the
        current stack during a consolidation, scored closed-book on the same answers. `forward`: what the
        student's gradient-carrying forwards go through (DDP's wrapper on several processes; the model itself)."""
        self.model, self.teacher, self.s_tok, self.t_tok, self.engine = model, teacher, s_tok, t_tok, engine
        self.forward = forward if forward is not None else model
        self.extra_teacher = extra_teacher
        self.cfg, self.contexts, self.batches, self.anchor = cfg, contexts, batches, anchor
        self.self_teacher = teacher is model  # "self": the same weights with every adapter off
        self.max_steps = max_steps or cfg.training.max_steps
        self.sampled: dict[int, Sampled] = {}
        self._ids: dict[tuple, list[int]] = {}  # rendered and tokenised prompts: the same few hundred every step

    def prompt_ids(self, e: Example, teacher: bool = False) -> list[int]:
        key = (teacher, e.trace_id if teacher else "", e.prompt)
        if key not in self._ids:
            tok = self.t_tok if teacher else self.s_tok
            mem = self.contexts.get(e.trace_id) if teacher else None
            self._ids[key] = tok(render(tok, self.cfg.data.system_prompt, e.prompt, mem), add_special_tokens=False)[
                "input_ids"
            ]
        return self._ids[key]

    # --- planning and sampling -------------------------------------------------------------------------

    def lmbda(self, step: int) -> float:
        lc = self.cfg.loss
        return lc.lmbda * min(1.0, step / lc.lmbda_warmup_steps) if lc.lmbda_warmup_steps else lc.lmbda

    def plan(self, batch: list[Example], step: int, rng: random.Random) -> Plan:
        lc = self.cfg.loss
        p = Plan(on_policy=rng.random() < self.lmbda(step))
        if lc.alpha > 0:
            if p.on_policy:
                p.gen_seed = rng.randrange(2**31)
            else:
                p.ys = [encode_answer(self.s_tok, rng.choice(e.samples)) for e in batch]
        if lc.alpha < 1:
            sysp = self.cfg.data.system_prompt
            n = max(1, len(batch) // lc.num_generations)
            for i in rng.sample(range(len(batch)), n):
                words = rng.choice(batch[i].samples).split()
                k = rng.randint(0, len(words) // 2)
                p.lti_prompts.append(render(self.s_tok, sysp, batch[i].prompt) + " ".join(words[:k]))
                p.lti_targets.append(" ".join(words[k:]))
            p.lti_seed = rng.randrange(2**31)
        return p

    def _sample_group(self, step: int) -> None:
        """Sample the rollouts of `step` and the steps after it in its generation group, in two engine calls."""
        k = self.cfg.training.steps_per_generation
        end = min(self.max_steps, step - step % k + k)
        sysp = self.cfg.data.system_prompt
        plans: dict[int, tuple[list[Example], Plan]] = {}
        for s in range(step, end):
            rng = random.Random(self.cfg.training.seed * 1_000_003 + s)  # what the loop's step_rng will draw
            b = self.batches(s, rng)
            plans[s] = (b, self.plan(b, s, rng))
        self.engine.sync(self.model, version=step)
        t0 = time.time()
        out = {s: Sampled() for s in plans}
        lc = self.cfg.loss
        on = [s for s, (_, p) in plans.items() if p.on_policy and lc.alpha > 0]
        tokens = 0
        if on:
            prompts = [render(self.s_tok, sysp, e.prompt) for s in on for e in plans[s][0]]
            ro = self.engine.generate(
                prompts,
                max_new_tokens=self.cfg.data.max_new_tokens,
                temperature=lc.temperature,
                seed=plans[on[0]][1].gen_seed,
            )
            tokens += ro.num_tokens
            i = 0
            for s in on:
                n = len(plans[s][0])
                out[s].ys = [c if c else [self.s_tok.eos_token_id] for c in ro.completion_ids[i : i + n]]
                i += n
        if lc.alpha < 1:
            lti = [s for s in plans if plans[s][1].lti_prompts]
            prompts = [x for s in lti for x in plans[s][1].lti_prompts]
            targets = [x for s in lti for x in plans[s][1].lti_targets]
            # the continuation need not run much past the target: cheaper rollouts, same reward
            budget = min(
                self.cfg.data.max_new_tokens,
                max(len(self.s_tok(t, add_special_tokens=False)["input_ids"]) for t in targets) + 8,
            )
            G = lc.num_generations
            ro = self.engine.generate(
                prompts,
                max_new_tokens=budget,
                temperature=lc.temperature,
                num_samples=G,
                seed=plans[lti[0]][1].lti_seed,
            )
            tokens += ro.num_tokens
            i = 0
            for s in lti:
                n = len(plans[s][1].lti_prompts) * G
                out[s].lti_prompt_ids = ro.prompt_ids[i : i + n]
                out[s].lti_completions = [c if c else [self.s_tok.eos_token_id] for c in ro.completion_ids[i : i + n]]
                out[s].lti_texts = ro.texts[i : i + n]
                i += n
        self.engine.sleep()  # the engine gives memory back while the trainer steps
        out[step].tokens, out[step].seconds = tokens, time.time() - t0
        self.sampled.update(out)

    # --- the loss ------------------------------------------------------------------------------------------

    def __call__(self, batch: list[Example], step: int, rng: random.Random) -> tuple[torch.Tensor, dict[str, Any]]:
        lc = self.cfg.loss
        plan = self.plan(batch, step, rng)
        if step not in self.sampled:
            self._sample_group(step)
        got = self.sampled.pop(step)
        device = next(self.model.parameters()).device
        m: dict[str, Any] = {"lmbda": self.lmbda(step), "on_policy": int(plan.on_policy)}
        if got.seconds:
            m["rollout_s"] = got.seconds
            m["rollout/tokens"] = got.tokens
            m["rollout/tokens_per_s"] = got.tokens / got.seconds if got.tokens else None
        t0 = time.time()
        loss = torch.zeros((), device=device)
        pad = self.s_tok.pad_token_id
        # the student's gradient-carrying passes, as rows of (prompts, completions)
        parts: dict[str, tuple[list[list[int]], list[list[int]]]] = {}
        if lc.alpha > 0:
            ys = got.ys if plan.on_policy else plan.ys
            s_ids = [self.prompt_ids(e) for e in batch]
            t_ids = [self.prompt_ids(e, teacher=True) for e in batch]
            parts["kd"] = (s_ids, ys)
            # positions through each model, prompt included: what a FLOPs count (gpu_bench's MFU) needs
            m["train/student_tokens"] = sum(len(a) + len(y) for a, y in zip(s_ids, ys))
            m["train/teacher_tokens"] = sum(len(a) + len(y) for a, y in zip(t_ids, ys))
        if lc.alpha < 1:
            adv, info = self._lti_advantages(plan, got)
            m.update(info)
            parts["lti"] = (got.lti_prompt_ids, got.lti_completions)
            m["train/lti_tokens"] = sum(len(a) + len(y) for a, y in zip(*parts["lti"]))
            m["train/lti_completion_tokens"] = sum(len(y) for y in got.lti_completions)
        anchored = False
        if self.anchor is not None and self.cfg.anchor.kl_coef > 0:
            parts["anchor"] = self.anchor.rows(self.anchor.batch(rng))
            anchored = bool(parts["anchor"][0])
            if anchored:
                base = self.anchor.base_logits(self.model, *parts["anchor"])
        if lc.alpha > 0:
            ctx = self.model.disable_adapter() if self.self_teacher else nullcontext()
            with torch.no_grad(), ctx:
                t_logits, _ = completion_logits(self.teacher, t_ids, ys, pad)
        student = student_logits(self.forward, parts, pad, merge=self.cfg.training.merge_forwards)
        if lc.alpha > 0:
            s_logits, mask = student.pop("kd")  # each part's logits go as soon as its loss is built
            kd = divergence(lc.divergence, s_logits, t_logits.to(s_logits.dtype), mask, lc.beta)
            del t_logits
            if self.extra_teacher is not None:
                make_ctx, coef = self.extra_teacher
                with torch.no_grad(), make_ctx():
                    x_logits, _ = completion_logits(self.model, s_ids, ys, pad)
                xkd = divergence(lc.divergence, s_logits, x_logits.to(s_logits.dtype), mask, lc.beta)
                kd = kd + coef * xkd
                m["train/stack_kd_loss"] = xkd.item()
                del x_logits
            loss = loss + lc.alpha * kd
            m["train/kd_loss"] = kd.item()
            m["train/tokens"] = int(mask.sum())
            del s_logits
        if lc.alpha < 1:
            logits, mask = student.pop("lti")
            logps = sequence_logps(logits, labels_tensor(got.lti_completions, device))
            del logits
            lti = policy_gradient_loss(logps, adv.to(device), mask)
            loss = loss + (1 - lc.alpha) * lti
            m["train/lti_loss"] = lti.item()
        if anchored:
            a_logits, a_mask = student.pop("anchor")
            kl = self.anchor.kl(a_logits, base, a_mask)
            del a_logits, base
            loss = loss + self.cfg.anchor.kl_coef * kl
            m["train/anchor_kl"] = kl.item()
            m["train/anchor_tokens"] = int(a_mask.sum())
        m["forward_s"] = time.time() - t0
        return loss, m

    def _lti_advantages(self, plan: Plan, got: Sampled) -> tuple[torch.Tensor, dict[str, Any]]:
        """Learning to Imitate: reward the continuations against the teacher's words; group-relative advantages
        for the policy gradient."""
        lc = self.cfg.loss
        G = lc.num_generations
        tgt = [t for t in plan.lti_targets for _ in range(G)]
        r_abs = torch.tensor([abs_reward(p, t, lc.z0) for p, t in zip(got.lti_texts, tgt)])
        if lc.gamma > 0:
            r_sem = (judge.similarity(got.lti_texts, tgt) >= lc.sem_threshold).float()
        else:
            r_sem = torch.zeros_like(r_abs)
        rewards = lti_reward(r_sem, r_abs, lc.gamma)
        adv = group_advantages(rewards, G, lc.scale_rewards)
        return adv, {
            "reward/mean": rewards.mean().item(),
            "reward/r_abs": r_abs.mean().item(),
            "reward/r_sem": r_sem.mean().item(),
        }


def student_logits(
    forward, parts: dict[str, tuple[list[list[int]], list[list[int]]]], pad: int, merge: bool = False
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Logits and completion masks of each part's rows through the student. `merge`: all rows in one forward,
    each part then cut to its own rows and length (fewer, larger kernels; a step of the 1.5B student on an
    H200 was bound by launches, not arithmetic), else one forward per part."""
    parts = {k: v for k, v in parts.items() if v[0]}
    if not merge or len(parts) < 2:
        return {k: completion_logits(forward, p, c, pad) for k, (p, c) in parts.items()}
    logits, mask = completion_logits(
        forward, [x for p, _ in parts.values() for x in p], [x for _, c in parts.values() for x in c], pad
    )
    out, i = {}, 0
    for k, (p, c) in parts.items():
        n, T = len(p), max(len(x) for x in c)
        out[k] = (logits[i : i + n, :T], mask[i : i + n, :T])
        i += n
    return out


# --- supervised fine-tuning: dream's ReST-EM and the naive baseline ------------------------------------------


@dataclass
class Pair:
    """One SFT example: a closed-book prompt and the answer to learn (None: the whole sequence is the target)."""

    prompt: str | None
    answer: str


def sft_tokens(tok, sysp: str, pairs: list[Pair]) -> tuple[list[list[int]], list[int]]:
    """Token ids of prompt + answer and where each answer starts: the loss covers answers only."""
    seqs, starts = [], []
    for p in pairs:
        prompt = tok(render(tok, sysp, p.prompt), add_special_tokens=False)["input_ids"] if p.prompt is not None else []
        answer = tok(p.answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        seqs.append(prompt + answer)
        starts.append(len(prompt))
    return seqs, starts


def pair_nll(model, tok, sysp: str, pairs: list[Pair]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pair, the summed NLL of its answer tokens and how many there are (`sft_loss` is their ratio over a
    batch; the dream's copies need each pair's own)."""
    device = next(model.parameters()).device
    seqs, starts = sft_tokens(tok, sysp, pairs)
    ids, mask = pad_right(seqs, tok.pad_token_id, device)
    labels = ids.masked_fill(mask == 0, -100)
    for i, s in enumerate(starts):
        labels[i, :s] = -100
    with bf16_compute(model):
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
    target = labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100, reduction="none")
    return nll.sum(1), (target != -100).sum(1)


def sft_loss(model, tok, sysp: str, pairs: list[Pair]) -> tuple[torch.Tensor, int]:
    """Mean NLL per answer token over the whole batch, and the number of answer tokens."""
    nll, n = pair_nll(model, tok, sysp, pairs)
    return nll.sum() / n.sum(), int(n.sum())


def group_nll(model, tok, sysp: str, groups: list[list[Pair]]) -> torch.Tensor:
    """Mean NLL per answer token of each group of pairs (as `sft_loss` of that group alone), in one batch."""
    pairs = [p for g in groups for p in g]
    which = torch.tensor([i for i, g in enumerate(groups) for _ in g])
    nll, n = pair_nll(model, tok, sysp, pairs)
    which = which.to(nll.device)
    total = torch.zeros(len(groups), device=nll.device, dtype=nll.dtype).index_add(0, which, nll)
    count = torch.zeros(len(groups), device=nll.device, dtype=nll.dtype).index_add(0, which, n.to(nll.dtype))
    return total / count


class SFTObjective:
    """Next-token loss on answers (dream's rewarded dreams plus replay; the naive baseline's raw traces)."""

    def __init__(self, model, tok, sysp: str, anchor=None, kl_coef: float = 0.0):
        self.model, self.tok, self.sysp, self.anchor, self.kl_coef = model, tok, sysp, anchor, kl_coef

    def __call__(self, batch: list[Pair], step: int, rng: random.Random) -> tuple[torch.Tensor, dict[str, Any]]:
        loss, n = sft_loss(self.model, self.tok, self.sysp, batch)
        m: dict[str, Any] = {"train/sft_loss": loss.item(), "train/tokens": n}
        if self.anchor is not None and self.kl_coef > 0:
            kl, _ = self.anchor.loss(self.model, self.anchor.batch(rng))
            loss = loss + self.kl_coef * kl
            m["train/anchor_kl"] = kl.item()
        return loss, m
