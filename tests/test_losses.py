"""The loss functions: known values, masking, batch-level normalisation, advantages, rewards."""

import math

import pytest
import torch

from sleepctl.losses import (
    abs_reward,
    divergence,
    generalized_jsd_loss,
    group_advantages,
    levenshtein,
    lti_reward,
    policy_gradient_loss,
    sequence_logps,
)


def _kl(p_logits, q_logits):
    p, q = p_logits.softmax(-1), q_logits.softmax(-1)
    return (p * (p.log() - q.log())).sum(-1)


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 11, generator=g), torch.randn(2, 3, 11, generator=g)


def test_beta_endpoints_are_forward_and_reverse_kl(logits):
    s, t = logits
    mask = torch.ones(2, 3, dtype=torch.bool)
    fwd = generalized_jsd_loss(s, t, mask, beta=0.0)
    rev = generalized_jsd_loss(s, t, mask, beta=1.0)
    assert torch.allclose(fwd, _kl(t, s).mean(), atol=1e-5)  # KL(teacher || student)
    assert torch.allclose(rev, _kl(s, t).mean(), atol=1e-5)  # KL(student || teacher)
    assert torch.allclose(divergence("forward_kl", s, t, mask), fwd)
    assert torch.allclose(divergence("reverse_kl", s, t, mask), rev)


def test_jsd_is_symmetric_at_half_and_bounded(logits):
    s, t = logits
    mask = torch.ones(2, 3, dtype=torch.bool)
    a = generalized_jsd_loss(s, t, mask, beta=0.5)
    b = generalized_jsd_loss(t, s, mask, beta=0.5)
    assert torch.allclose(a, b, atol=1e-5)
    assert 0 < a.item() <= math.log(2) + 1e-6


def test_zero_when_equal_and_masked_positions_ignored(logits):
    s, t = logits
    mask = torch.ones(2, 3, dtype=torch.bool)
    assert generalized_jsd_loss(s, s.clone(), mask, beta=0.3).abs() < 1e-6
    mask2 = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    t2 = t.clone()
    t2[0, 2] = 1e3  # garbage at a masked position must not matter
    t2[1, 1:] = -1e3
    assert torch.allclose(generalized_jsd_loss(s, t, mask2, beta=1.0), generalized_jsd_loss(s, t2, mask2, beta=1.0))


def test_normalised_by_batch_tokens_not_per_sequence(logits):
    s, t = logits
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    whole = generalized_jsd_loss(s, t, mask, beta=0.0)
    per_tok = _kl(t, s)
    assert torch.allclose(whole, per_tok[mask].sum() / 4, atol=1e-5)


def test_gradient_flows_only_to_student(logits):
    s, t = logits
    s = s.clone().requires_grad_()
    t = t.clone().requires_grad_()
    generalized_jsd_loss(s, t.detach(), torch.ones(2, 3, dtype=torch.bool), beta=1.0).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and t.grad is None


def test_group_advantages():
    r = torch.tensor([1.0, 0.0, 0.5, 0.5, 0.2, 0.4])
    a = group_advantages(r, 2)
    assert torch.allclose(a, torch.tensor([0.5, -0.5, 0.0, 0.0, -0.1, 0.1]), atol=1e-6)
    scaled = group_advantages(r, 2, scale_rewards=True)
    assert scaled[0] > 0.5 and scaled[2] == 0


def test_edit_distance_reward():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("abc".split(), "abc".split()) == 0
    assert abs_reward("the server is in Tallinn", "the server is in Tallinn", z0=0.5) == 1.0
    near = abs_reward("the server is in Riga", "the server is in Tallinn", z0=0.5)
    assert near == pytest.approx(0.8)
    assert abs_reward("completely different words here", "the server is in Tallinn", z0=0.5) == 0.0
    assert torch.allclose(lti_reward(torch.tensor([1.0]), torch.tensor([0.5]), gamma=0.25), torch.tensor([0.625]))


def test_policy_gradient_sign_and_logps():
    logits = torch.zeros(1, 2, 5, requires_grad=True)
    labels = torch.tensor([[1, 2]])
    lp = sequence_logps(logits, labels)
    assert torch.allclose(lp, torch.full((1, 2), -math.log(5)))
    loss = policy_gradient_loss(lp, torch.tensor([1.0]), torch.ones(1, 2))
    loss.backward()
    # positive advantage: descending the loss raises the chosen tokens' logits
    assert logits.grad[0, 0, 1] < 0 and logits.grad[0, 1, 2] < 0
