"""Adam (Kingma and Ba, 2015) for the engine's instance optimisers, without ``torch.optim``.

The first ``torch.optim`` optimiser a process creates imports ``torch._dynamo``, which takes
2-3 s of a 2-core machine: as long as the whole alignment of a 2 mm brain. A registration is
one short process, so its optimisers (a handful of tensors each) use this plain implementation
of the same update instead. Training keeps ``torch.optim``.
"""
from __future__ import annotations

from typing import Iterable, List, Tuple

import torch


class Adam:
    """``torch.optim.Adam`` without weight decay or amsgrad, same defaults and the same update::

        m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
        p -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
    """

    def __init__(self, params: Iterable[torch.Tensor], lr: float = 1e-3,
                 betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.params: List[torch.Tensor] = list(params)
        if not self.params:
            raise ValueError("Adam needs at least one parameter")
        if lr <= 0 or not 0 <= betas[0] < 1 or not 0 <= betas[1] < 1 or eps <= 0:
            raise ValueError(f"invalid Adam settings lr={lr}, betas={betas}, eps={eps}")
        self.lr, self.betas, self.eps, self.t = float(lr), betas, float(eps), 0
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        b1, b2 = self.betas
        c1, c2 = 1.0 - b1 ** self.t, 1.0 - b2 ** self.t
        for p, m, v in zip(self.params, self.m, self.v):
            if p.grad is None:
                continue
            g = p.grad
            m.mul_(b1).add_(g, alpha=1.0 - b1)
            v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
            p.addcdiv_(m, (v / c2).sqrt_().add_(self.eps), value=-self.lr / c1)
