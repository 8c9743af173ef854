"""Copies of the adapter in one batch (the dream's scoring and rewards): each copy behaves as the adapter alone."""

from __future__ import annotations

import copy

import pytest
import torch

from sleepctl.adapters import NEW
from sleepctl.dream import dream_pairs, dream_rewards, dream_scores, reward_pairs
from sleepctl.lora_copies import LoraCopies
from sleepctl.models import load_model
from sleepctl.objectives import Pair, group_nll, pair_nll, sft_loss
from sleepctl.recipe import Dream, Lora
from sleepctl.records import Probe, Trace
from sleepctl.training import add_lora

from .conftest import randomize_lora_b

SYSP = "You are a helpful assistant."
GROUPS = [
    [Pair("Where does the Kestrel build server run now?", "It runs in Tallinn since last Tuesday.")],
    [
        Pair("Who moved the Kestrel build server?", "Orla Brennick moved it."),
        Pair("When did it move?", "Last Tuesday, after the outage."),
    ],
    [Pair("When is the Marrow deadline?", "March 14, after Quillfeather shipped late.")],
]


@pytest.fixture
def model_tok(tiny_dir):
    torch.manual_seed(0)
    base, tok = load_model(str(tiny_dir), "cpu", "float32")
    # float64: two SGD steps at a large rate amplify float32 rounding past what a test can tell from a bug
    model = add_lora(base, Lora(r=4, alpha=8), fused=False).double()
    randomize_lora_b(model, 0.05)
    return model, tok


def adapter_grads(model, tok, copies: LoraCopies, pairs: list[Pair]) -> list[torch.Tensor]:
    """The oracle: the adapter's own gradient of sft_loss on `pairs` alone, in the copies' tensor order."""
    model.zero_grad(set_to_none=True)
    sft_loss(model, tok, SYSP, pairs)[0].backward()
    return [w.grad.clone() for m in copies.layers for w in (m.lora_A[NEW].weight, m.lora_B[NEW].weight)]


def rows_of(groups: list[list[Pair]]) -> list[int]:
    return [j for j, g in enumerate(groups) for _ in g]


def test_group_nll_is_each_groups_sft_loss(model_tok):
    model, tok = model_tok
    with torch.no_grad():
        got = group_nll(model, tok, SYSP, GROUPS)
        want = torch.stack([sft_loss(model, tok, SYSP, g)[0] for g in GROUPS])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    nll, n = pair_nll(model, tok, SYSP, GROUPS[1])  # per pair: the tokens of its answer and its end
    assert n.tolist() == [len(tok(p.answer, add_special_tokens=False)["input_ids"]) + 1 for p in GROUPS[1]]
    torch.testing.assert_close(nll.sum() / n.sum(), sft_loss(model, tok, SYSP, GROUPS[1])[0])


def test_each_copy_gets_its_own_groups_gradient(model_tok):
    model, tok = model_tok
    copies = LoraCopies(model, 4)  # one more copy than groups: the spare one must stay at zero gradient
    with copies.active(rows_of(GROUPS)):
        loss = group_nll(model, tok, SYSP, GROUPS).sum()
    grads = torch.autograd.grad(loss, copies.params())
    for g, pairs in enumerate(GROUPS):
        want = adapter_grads(model, tok, copies, pairs)
        assert any(w.abs().max() > 0 for w in want)
        for got, w in zip(grads, want):
            torch.testing.assert_close(got[g], w, atol=1e-6, rtol=1e-4)
    assert all(x[3].abs().max() == 0 for x in grads)


def test_sgd_on_copies_is_sgd_on_isolated_adapters_and_leaves_the_adapter_alone(model_tok):
    model, tok = model_tok
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    copies = LoraCopies(model, 3)
    for _ in range(2):
        with copies.active(rows_of(GROUPS)):
            loss = group_nll(model, tok, SYSP, GROUPS).sum()
        copies.sgd_step(torch.autograd.grad(loss, copies.params()), lr=0.5)
    probe = [[Pair("Where is the Kestrel build server?", "In Tallinn.")]] * 3
    with torch.no_grad(), copies.active(rows_of(probe)):
        got = group_nll(model, tok, SYSP, probe)
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, before[name]), name  # the adapter itself never moved
    for g, pairs in enumerate(GROUPS):
        iso = copy.deepcopy(model)
        opt = torch.optim.SGD([p for p in iso.parameters() if p.requires_grad], lr=0.5)
        for _ in range(2):
            opt.zero_grad(set_to_none=True)
            sft_loss(iso, tok, SYSP, pairs)[0].backward()
            opt.step()
        with torch.no_grad():
            want = sft_loss(iso, tok, SYSP, probe[0])[0]
        torch.testing.assert_close(got[g], want, atol=1e-5, rtol=1e-5)
    assert len({round(x, 6) for x in got.tolist()}) == 3  # three different copies, three different results
    copies.reset()
    with torch.no_grad():
        with copies.active(rows_of(probe)):
            again = group_nll(model, tok, SYSP, probe)
        plain = group_nll(model, tok, SYSP, probe[:1])
    torch.testing.assert_close(again, plain.expand(3))  # reset: every copy is the adapter again


def test_copies_work_over_a_fused_adapter_under_autocast(tiny_dir):
    """On a GPU the LoRA layers are the fused class and run under autocast: the hooks add there too, and a
    copy's gradient is the adapter's own to bf16's precision."""
    base, tok = load_model(str(tiny_dir), "cpu", "bfloat16")
    model = add_lora(base, Lora(r=4, alpha=8), fused=True)
    randomize_lora_b(model, 0.3)
    copies = LoraCopies(model, 2)
    pairs = GROUPS[1]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with copies.active([1] * len(pairs)):
            got = torch.autograd.grad(group_nll(model, tok, SYSP, [pairs]).sum(), copies.params())
        model.zero_grad(set_to_none=True)
        group_nll(model, tok, SYSP, [pairs]).sum().backward()
    want = [w.grad for m in copies.layers for w in (m.lora_A[NEW].weight, m.lora_B[NEW].weight)]
    flat_got = torch.cat([g[1].reshape(-1) for g in got])
    flat_want = torch.cat([w.reshape(-1) for w in want])
    assert torch.nn.functional.cosine_similarity(flat_got, flat_want, dim=0) > 0.999
    assert (flat_got - flat_want).norm() < 0.03 * flat_want.norm()
    assert all(g[0].abs().max() == 0 for g in got)  # no row went through copy 0
    with torch.no_grad():
        copies.deltas[0][1][1].normal_(0, 0.5)  # copy 1's B delta on the first layer
    ids = torch.tensor([[5, 17, 300, 9, 44, 12], [5, 17, 300, 9, 44, 12]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = model(input_ids=ids[:1]).logits.float()
        with copies.active([0, 1]):
            out = model(input_ids=ids).logits.float()
    torch.testing.assert_close(out[0], plain[0])  # copy 0 (zero delta) is the adapter
    assert (out[1] - plain[0]).abs().max() > 1e-3  # copy 1 is not


def test_bad_rows_are_refused(model_tok, tiny_dir):
    model, tok = model_tok
    copies = LoraCopies(model, 2)
    with pytest.raises(ValueError, match="outside 0..1"):
        with copies.active([0, 2]):
            pass
    with pytest.raises(ValueError, match="a batch of 2 rows"):
        with copies.active([0, 1, 1]):
            group_nll(model, tok, SYSP, GROUPS[1:2])
    base, _ = load_model(str(tiny_dir), "cpu", "float32")
    with pytest.raises(ValueError, match="no LoRA layer"):
        LoraCopies(base, 2)
    # a LoRA on the embedding too: its copies would be missing, and the copies would not be the adapter
    names = {n.rsplit(".", 1)[-1] for n, _ in base.named_modules()}
    emb = next(n for n in ("embed_tokens", "wte") if n in names)
    both = add_lora(base, Lora(r=4, alpha=8, target_modules=["q_proj", emb]), fused=False)
    with pytest.raises(ValueError, match="trainable but not copied"):
        LoraCopies(both, 2)


def test_a_layer_called_with_its_input_as_a_keyword_gets_its_copy(model_tok):
    model, _ = model_tok
    copies = LoraCopies(model, 2)
    layer = copies.layers[0]
    with torch.no_grad():
        copies.deltas[0][1][1].normal_(0, 0.5)
        x = torch.randn(2, 3, layer.in_features, dtype=torch.float64)
        plain = layer(x)
        with copies.active([0, 1]):
            out = layer(x=x)
    torch.testing.assert_close(out[0], plain[0])
    assert (out[1] - plain[1]).abs().max() > 1e-3


def _traces_and_dreams():
    at = {"kind": "note", "source": "test", "created_at": "2026-11-28T00:00:00Z", "updated_at": "2026-11-28T00:00:00Z"}
    ts = [
        Trace(
            id="t1",
            hash="h1",
            text="The Kestrel build server moved to Tallinn last Tuesday; Orla Brennick moved it.",
            **at,
        ),
        Trace(id="t2", hash="h2", text="The Marrow deadline is March 14, after Quillfeather shipped late.", **at),
    ]
    at = {"origin": "teacher", "split": "train", "created_at": "2026-11-28T00:00:00Z"}
    probes = [
        Probe(id="p1", trace_id="t1", question="Where is the Kestrel build server?", answer="Tallinn", **at),
        Probe(id="p2", trace_id="t2", question="When is the Marrow deadline?", answer="March 14", **at),
        Probe(id="p3", trace_id="t1", question="Who moved the Kestrel build server?", answer="Orla Brennick", **at),
    ]
    dreams = [
        {"id": "d0", "trace_id": "t1", "kind": "rephrase", "text": "Kestrel's build server now runs in Tallinn."},
        {"id": "d1", "trace_id": "t1", "kind": "qa", "text": "Q: Who moved it? A: Orla Brennick. Q: When? A: Tuesday."},
        {"id": "d2", "trace_id": "t1", "kind": "implication", "text": "Builds may be slower from Berlin now."},
        {"id": "d3", "trace_id": "t2", "kind": "rephrase", "text": "Marrow is due on March 14."},
    ]
    return ts, probes, dreams


@pytest.mark.parametrize("n", [1, 2, 3, 8])  # 1-3 split t1's three dreams over passes; 8 holds both memories
def test_dream_scores_are_the_cosines_of_the_flat_gradients(model_tok, n):
    model, tok = model_tok
    ts, probes, dreams = _traces_and_dreams()
    got = dream_scores(model, tok, SYSP, ts, dreams, probes, n, lambda: False)
    copies = LoraCopies(model, 2)
    for d in dreams:
        t = next(t for t in ts if t.id == d["trace_id"])
        g_d = torch.cat([w.reshape(-1) for w in adapter_grads(model, tok, copies, dream_pairs(d, t))])
        g_p = torch.cat([w.reshape(-1) for w in adapter_grads(model, tok, copies, reward_pairs(t, probes))])
        want = torch.nn.functional.cosine_similarity(g_d, g_p, dim=0).item()
        assert got[d["id"]] == pytest.approx(want, abs=1e-4)
    assert dream_scores(model, tok, SYSP, ts, dreams, probes, n, lambda: True) is None  # out of time


@pytest.mark.parametrize("n", [1, 3])  # 1: a memory's probe batch measured once for its dreams; 3: mixed chunks
def test_dream_rewards_match_isolated_sgd_per_dream(model_tok, n):
    model, tok = model_tok
    ts, probes, dreams = _traces_and_dreams()
    dc = Dream(inner_steps=2, inner_lr=0.5)
    by_trace = {t.id: t for t in ts}
    dreams = [dreams[0], dreams[3], dreams[1], dreams[2]]  # a chunk of three holds both memories' dreams
    got = dream_rewards(model, tok, SYSP, dreams, by_trace, probes, dc, n, lambda: False)
    assert set(got) == {d["id"] for d in dreams}
    for d in dreams:
        t = by_trace[d["trace_id"]]
        iso = copy.deepcopy(model)
        with torch.no_grad():
            before = sft_loss(iso, tok, SYSP, reward_pairs(t, probes))[0].item()
        opt = torch.optim.SGD([p for p in iso.parameters() if p.requires_grad], lr=0.5)
        for _ in range(2):
            opt.zero_grad(set_to_none=True)
            sft_loss(iso, tok, SYSP, dream_pairs(d, t))[0].backward()
            opt.step()
        with torch.no_grad():
            after = sft_loss(iso, tok, SYSP, reward_pairs(t, probes))[0].item()
        r = got[d["id"]]
        assert r["before"] == pytest.approx(before, rel=1e-5) and r["after"] == pytest.approx(after, rel=1e-5)
        assert r["reward"] == int(before - after > dc.reward_margin)
    assert dream_rewards(model, tok, SYSP, dreams, by_trace, probes, dc, n, lambda: True) is None
