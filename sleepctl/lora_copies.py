"""Many copies of the trainable LoRA in one batch: each row of a batch runs through a copy of its own.

The dream asks of every dream "what gradient would it give?" and "how far would two SGD steps on it move
its memory's probe loss?", each on an isolated copy of the adapter. One dream at a time, that was hundreds
of batch-of-one passes (a dream of 20 memories on an H200: 33 s scoring, 47 s rewarding, of 104 s).

A copy is the adapter plus a delta (a, b) on each LoRA layer's A and B. A forward hook on the layer adds,
for row n of copy g, s * (B0 a_g + b_g (A0 + a_g)) x, which is (B0 + b_g)(A0 + a_g) x - B0 A0 x: the
layer's own forward has already added s * B0 A0 x. Copies share nothing trainable, so the gradient of a
sum of per-copy losses with respect to copy g's delta is the gradient of copy g's loss alone; and at a
zero delta it equals the gradient with respect to the adapter itself.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from .adapters import NEW


class LoraCopies:
    """`n` copies of `adapter` on every LoRA layer of `model`, all starting equal to it (zero deltas)."""

    def __init__(self, model, n: int, adapter: str = NEW):
        from peft.tuners.lora.layer import Linear

        self.layers = [m for m in model.modules() if isinstance(m, Linear) and adapter in m.lora_A]
        if not self.layers:
            raise ValueError(f"no LoRA layer holds the adapter {adapter!r}")
        # every trainable tensor must have its copies: a LoRA on another layer type (an embedding) would be
        # left out silently, and the copies would not be the adapter
        copied = {id(w) for m in self.layers for w in (m.lora_A[adapter].weight, m.lora_B[adapter].weight)}
        left = [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in copied]
        if left:
            raise ValueError(f"copies cover LoRA Linear layers only; trainable but not copied: {left[0]}")
        self.adapter, self.n = adapter, n
        self.deltas: list[tuple[torch.Tensor, torch.Tensor]] = []
        # one copy is the adapter itself, stepped in place and put back by reset(): no hooks, which on a CPU
        # cost a third more per pass
        self._init = [w.detach().clone() for w in self.weights()] if n == 1 else []
        for m in self.layers if n > 1 else []:
            A, B = m.lora_A[adapter].weight, m.lora_B[adapter].weight
            # in the adapter's own dtype: PEFT keeps it float32 under a bf16 base, as the optimizer would see it
            a = torch.zeros((n, *A.shape), device=A.device, dtype=A.dtype, requires_grad=True)
            b = torch.zeros((n, *B.shape), device=B.device, dtype=B.dtype, requires_grad=True)
            self.deltas.append((a, b))
        self.rows: torch.Tensor | None = None

    def params(self) -> list[torch.Tensor]:
        """What the copies train: the deltas, or for a single copy the adapter's own tensors."""
        return [t for ab in self.deltas for t in ab] if self.n > 1 else self.weights()

    def weights(self) -> list[torch.Tensor]:
        """The adapter's own tensors, in the order of `params()`."""
        return [w for m in self.layers for w in (m.lora_A[self.adapter].weight, m.lora_B[self.adapter].weight)]

    def grad(self, loss: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Per LoRA tensor, [n, ...]: copy j's gradient of `loss` (the adapter's own for a copy at zero delta)."""
        grads = torch.autograd.grad(loss, self.params())
        return grads if self.n > 1 else tuple(g.unsqueeze(0) for g in grads)

    @torch.no_grad()
    def reset(self) -> None:
        """Every copy back to the adapter as it was when the copies were made."""
        if self.n == 1:
            for w, w0 in zip(self.weights(), self._init):
                w.copy_(w0)
        else:
            for t in self.params():
                t.zero_()

    @torch.no_grad()
    def sgd_step(self, grads: tuple[torch.Tensor, ...], lr: float) -> None:
        """Plain SGD on every copy at once, as `torch.optim.SGD` (no momentum, no decay) steps one adapter;
        `grads` as `grad()` gives them."""
        for t, g in zip(self.params(), grads):
            t.sub_(lr * g.view_as(t))

    @contextmanager
    def active(self, rows: list[int]):
        """Within: row i of every batch the model sees runs through copy `rows[i]`."""
        if max(rows) >= self.n or min(rows) < 0:
            raise ValueError(f"rows name copies outside 0..{self.n - 1}")
        self.rows = torch.tensor(rows, dtype=torch.long, device=self.weights()[0].device)
        hooked = self.layers if self.n > 1 else []  # a single copy is the adapter: nothing to add
        handles = [m.register_forward_hook(self._hook(i), with_kwargs=True) for i, m in enumerate(hooked)]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
            self.rows = None

    def _hook(self, i: int):
        a, b = self.deltas[i]

        def add_copy(mod, args, kwargs, out):
            x = args[0] if args else kwargs["x"]
            n = x.shape[0]
            if self.rows is None or n != len(self.rows):
                given = 0 if self.rows is None else len(self.rows)
                raise ValueError(f"a batch of {n} rows, but copies were given for {given}")
            x3 = x.reshape(n, -1, x.shape[-1])
            dt = x3.dtype
            A0 = mod.lora_A[self.adapter].weight.to(dt)
            B0 = mod.lora_B[self.adapter].weight.to(dt)
            ar, br = a[self.rows].to(dt), b[self.rows].to(dt)  # [n, r, in], [n, out, r]
            u = torch.einsum("ntd,nrd->ntr", x3, ar)  # a_g x
            h = x3 @ A0.t() + u  # (A0 + a_g) x
            d = u @ B0.t() + torch.einsum("ntr,nor->nto", h, br)
            return out + (mod.scaling[self.adapter] * d).reshape(out.shape).to(out.dtype)

        return add_copy
