"""The seed objective's student passes: one forward for all of them (`training.merge_forwards`) is the same loss
and the same gradient as one forward each; the anchor's KL in completion rows equals the full-sequence form."""

from __future__ import annotations

import random
from contextlib import nullcontext

import pytest
import torch

from sleepctl.anchor import AnchorText
from sleepctl.data import Example
from sleepctl.engines import HFEngine
from sleepctl.losses import generalized_jsd_loss
from sleepctl.models import load_model
from sleepctl.objectives import SeedObjective
from sleepctl.recipe import load_recipe
from sleepctl.training import add_lora, bf16_compute, pad_right

from .conftest import randomize_lora_b, write_recipe

BATCH = [
    Example("t1", "Where does the Kestrel build server run now?", ["It runs in Tallinn since last Tuesday."]),
    Example("t1", "Who moved the Kestrel build server?", ["Orla Brennick moved it."]),
    Example("t2", "When is the Marrow deadline?", ["March 14, after Quillfeather shipped late."]),
    Example("t2", "Who approved the Marrow slip?", ["Dana Okafor signed off on the delay."]),
]
CONTEXTS = {"t1": [], "t2": []}


def student(tiny_dir, cfg):
    torch.manual_seed(0)
    base, tok = load_model(str(tiny_dir), "cpu", "float32")
    model = add_lora(base, cfg.lora, fused=False)
    randomize_lora_b(model, 0.05)
    return model, tok


def loss_and_grads(model, tok, cfg, step: int) -> tuple[float, dict, dict]:
    anchor = AnchorText(tok, cfg)
    objective = SeedObjective(
        model, model, tok, tok, HFEngine(model, tok), cfg, CONTEXTS, lambda s, r: BATCH, anchor, max_steps=4
    )
    model.zero_grad(set_to_none=True)
    loss, m = objective(BATCH, step, random.Random(step))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads, m


@pytest.mark.parametrize("lmbda", [0.0, 1.0])  # the teacher's answers, and the student's own samples
def test_one_merged_forward_is_the_same_loss_and_gradient(tmp_path, tiny_dir, lmbda):
    loss = {"alpha": 0.5, "lmbda": lmbda, "num_generations": 2, "gamma": 0.0, "divergence": "forward_kl"}
    rcp = write_recipe(tmp_path / "r.yaml", tiny_dir, loss=loss, anchor={"kl_coef": 0.5, "batch_size": 2})
    out = {}
    for merge in (False, True):
        cfg, _ = load_recipe(str(rcp), {"training.merge_forwards": merge})
        model, tok = student(tiny_dir, cfg)
        out[merge] = loss_and_grads(model, tok, cfg, step=3)
    (l0, g0, m0), (l1, g1, m1) = out[False], out[True]
    assert m0["train/anchor_kl"] > 0 and m0["train/kd_loss"] > 0 and "train/lti_loss" in m0  # all three parts ran
    assert l1 == pytest.approx(l0, rel=1e-5, abs=1e-6)
    for k in ("train/kd_loss", "train/lti_loss", "train/anchor_kl", "train/tokens", "train/anchor_tokens"):
        assert m1[k] == pytest.approx(m0[k], rel=1e-5, abs=1e-6), k
    assert g0.keys() == g1.keys() and len(g0) > 0
    for n in g0:
        assert torch.allclose(g0[n], g1[n], rtol=1e-4, atol=1e-6), n


def test_anchor_kl_in_completion_rows_equals_the_full_sequence_form(tmp_path, tiny_dir):
    rcp = write_recipe(tmp_path / "r.yaml", tiny_dir, anchor={"kl_coef": 1.0, "batch_size": 3})
    cfg, _ = load_recipe(str(rcp))
    model, tok = student(tiny_dir, cfg)
    anchor = AnchorText(tok, cfg)
    seqs = anchor.batch(random.Random(0)) + [[tok.eos_token_id]]  # a one-token paragraph has nothing to score
    kl, n = anchor.loss(model, seqs)
    # the form it replaced: every position's logits, the mask shifted by one
    ids, mask = pad_right(seqs, tok.pad_token_id, "cpu")
    with torch.no_grad(), model.disable_adapter(), bf16_compute(model):
        base = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    with torch.no_grad(), bf16_compute(model):
        full = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    m = mask[:, 1:].bool()
    assert n == int(m.sum()) and kl.item() > 0
    assert kl.item() == pytest.approx(generalized_jsd_loss(full, base, m, beta=0.0).item(), rel=1e-5)


def test_compiled_blocks_train_the_same_and_sampling_runs_eager(tmp_path, dynamo_clean):
    """`training.compile`: every block call of a seed step (the self teacher with adapters off, the anchor's
    base, the student's training pass) runs compiled, for the same loss and gradient, while the HF engine's
    sampling inside the step runs eager. Twelve blocks: a per-block recompile would pass dynamo's limit and
    leave blocks eager, which the count catches. A counting backend stands in for inductor (its code
    generation is torch's to test; what is ours is which calls reach the compiled graphs)."""
    from sleepctl.training import compile_layers, decoder_layers

    from .conftest import tiny_model

    model_dir = tiny_model(tmp_path / "m12", layers=12)
    loss = {"alpha": 1.0, "lmbda": 1.0, "divergence": "forward_kl"}  # on-policy: the step samples through HF
    rcp = write_recipe(tmp_path / "r.yaml", model_dir, loss=loss, anchor={"kl_coef": 0.5, "batch_size": 2})
    cfg, _ = load_recipe(str(rcp), {"training.merge_forwards": True})
    model, tok = student(model_dir, cfg)
    layers = decoder_layers(model)
    sampling, calls = [False], {"eager": 0, "eager_sampling": 0, "compiled": 0, "graphs": 0}

    def count(module, args):
        calls["eager_sampling" if sampling[0] else "eager"] += 1

    hooks = [layer.register_forward_pre_hook(count) for layer in layers]
    generate = model.generate

    def watched(*a, **kw):
        seen.append([m._compiled_call_impl for m in layers])
        sampling[0] = True
        try:
            return generate(*a, **kw)
        finally:
            sampling[0] = False

    seen: list = []
    model.generate = watched
    eager_loss, eager_grads, _ = loss_and_grads(model, tok, cfg, step=3)
    for h in hooks:
        h.remove()
    assert calls["eager"] >= 3 * len(layers) and calls["eager_sampling"] > 0  # teacher, anchor, student; sampling

    def counting(gm, example_inputs):
        calls["graphs"] += 1

        def run(*a):
            calls["compiled"] += 1
            return gm.forward(*a)

        return run

    assert compile_layers(model, backend=counting) == len(layers) == 12
    seen.clear()
    compiled_loss, compiled_grads, m = loss_and_grads(model, tok, cfg, step=3)
    assert m["on_policy"] == 1 and seen and all(f is None for row in seen for f in row)  # sampled eager
    assert all(layer._compiled_call_impl is not None for layer in layers)  # and compiled again after it
    assert calls["compiled"] == calls["eager"]  # every block call outside sampling ran compiled
    assert calls["graphs"] <= 4  # one graph a mode, all twelve blocks through it (a KV cache made one per block)
    # every mode a night's process meets (grad or not, adapters on or off, train or eval, a row alone with no
    # padding mask) is more graphs than dynamo's default limit of 8: each still runs compiled
    from itertools import product

    from sleepctl.training import completion_logits

    before, forwards = calls["compiled"], 0
    for grad, adapters, train, rows in product((True, False), (True, False), (True, False), (1, 3)):
        model.train(train)
        with torch.set_grad_enabled(grad), nullcontext() if adapters else model.disable_adapter():
            completion_logits(model, [[5, 6, 7]] * rows, [[8, 9]] * rows, tok.pad_token_id)
        forwards += 1
    assert calls["graphs"] > 8 and calls["compiled"] - before == forwards * len(layers)
    assert compiled_loss == pytest.approx(eager_loss, rel=1e-4, abs=1e-5)
    assert compiled_grads.keys() == eager_grads.keys()
    for n in eager_grads:
        assert torch.allclose(compiled_grads[n], eager_grads[n], rtol=1e-3, atol=1e-5), n
