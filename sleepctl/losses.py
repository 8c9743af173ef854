"""Losses as pure functions, one copy each; names follow TRL's GKD and GRPO where the idea is the same."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def generalized_jsd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    beta: float = 0.5,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-token generalised JSD over the vocabulary, averaged over the counted tokens of the whole batch.

    beta=0 is forward KL(teacher‖student), beta=1 reverse KL(student‖teacher), as in GKD.
    Normalised by the batch's token count, not per sequence or micro-batch (TRL #4719).
    """
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if beta == 0.0:
        per_tok = (t.exp() * (t - s)).sum(-1)
    elif beta == 1.0:
        per_tok = (s.exp() * (s - t)).sum(-1)
    else:
        m = torch.logsumexp(torch.stack([s + math.log(1 - beta), t + math.log(beta)]), dim=0)
        kl_t = (t.exp() * (t - m)).sum(-1)
        kl_s = (s.exp() * (s - m)).sum(-1)
        per_tok = beta * kl_t + (1 - beta) * kl_s
    mask = mask.to(per_tok.dtype)
    return (per_tok * mask).sum() / mask.sum().clamp(min=1.0)


def divergence(
    kind: str, student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, beta: float = 0.5
) -> torch.Tensor:
    """The recipe's `D`: reverse_kl, forward_kl, or jsd with `beta`."""
    b = {"reverse_kl": 1.0, "forward_kl": 0.0}.get(kind, beta)
    return generalized_jsd_loss(student_logits, teacher_logits, mask, beta=b)


def levenshtein(a: list | str, b: list | str) -> int:
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def abs_reward(pred: str, target: str, z0: float) -> float:
    """r_abs = 1 - lev/max_len when the normalised edit distance is under z0, else 0 (on words)."""
    p, t = pred.split(), target.split()
    n = max(len(p), len(t))
    if n == 0:
        return 1.0
    d = levenshtein(p, t) / n
    return 1.0 - d if d < z0 else 0.0


def lti_reward(r_sem: torch.Tensor, r_abs: torch.Tensor, gamma: float) -> torch.Tensor:
    return gamma * r_sem + (1 - gamma) * r_abs


def group_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: bool = False) -> torch.Tensor:
    """GRPO: reward minus its group's mean (optionally over the group's std); groups are consecutive."""
    g = rewards.view(-1, num_generations)
    adv = g - g.mean(dim=1, keepdim=True)
    if scale_rewards:
        adv = adv / (g.std(dim=1, keepdim=True) + 1e-4)
    return adv.view(-1)


def policy_gradient_loss(logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """-A·log π over completion tokens, normalised by the batch's token count."""
    mask = mask.to(logps.dtype)
    return -(logps * advantages.unsqueeze(1) * mask).sum() / mask.sum().clamp(min=1.0)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token log-probs of `labels` under `logits` (already aligned: logits[t] predicts labels[t])."""
    return torch.gather(F.log_softmax(logits.float(), dim=-1), -1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
