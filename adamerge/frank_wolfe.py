"""FW-Merging (arXiv 2503.12649): Frank-Wolfe over the merge coefficients, as a ``torch.optim.Optimizer``.

The merged model stays inside the convex hull of the base and the experts: each coefficient column
(one per coefficient of a granularity, over the K experts) lies in ``{c >= 0, sum_k c_k <= 1}``, whose
vertices are the base (``c = 0``) and each expert alone (``c = e_k``). Each step the linear
minimization oracle picks, per column, the vertex with the smallest inner product with the gradient:
expert ``argmin_k dL/dc_k`` if that derivative is negative, else the base, and the iterate moves toward
it, ``c <- c + gamma_t (s - c)`` with ``gamma_t = lr * 2 / (t + 2)``. Since ``dL/dc_k = <dL/dW, tau_k>``,
this is the oracle of the released code (github.com/hmarkc/FW-Merging, generative/merge.py
``frank_wolfe_merge``: per parameter the task vector most aligned against the gradient, none where every
alignment is >= 0; ``step = 2 / (iteration + 2) * step_size``), which ranks by cosine, i.e. divides by
``||tau_k||``; the two agree on every zero-vertex choice and whenever the experts' norms are equal.
The coefficients must be the raw parameters (``granularity.transform=identity``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from adamerge.errors import AdamergeError
from adamerge.objectives.base import Objective


def check_frank_wolfe(transform: str, objective: Objective) -> None:
    """Refuse, before loading, what the hull cannot constrain: transformed coefficients (the oracle moves the raw
    parameters) and an objective's own tensors (DOGE's, WUDI's), which are no coefficients."""
    if transform != "identity":
        raise AdamergeError(f"optim=frank_wolfe keeps the coefficients in the hull of the base and the experts: it "
                            f"needs granularity.transform=identity, not {transform!r}")
    if type(objective).extra_parameters is not Objective.extra_parameters:
        raise AdamergeError(f"optim=frank_wolfe constrains merge coefficients only; objective "
                            f"{type(objective).__name__} trains tensors of its own (use optim=adam)")


def linear_oracle(grad: torch.Tensor) -> torch.Tensor:
    """The vertex of ``{c >= 0, sum c <= 1}`` (per column of a ``(K, n)`` gradient) minimizing ``<grad, s>``."""
    best = grad.argmin(dim=0, keepdim=True)
    vertex = torch.zeros_like(grad).scatter_(0, best, 1.0)
    return vertex * (grad.gather(0, best) < 0)


class FrankWolfe(torch.optim.Optimizer):
    """Args: params (``(K, n)`` coefficient tables), lr (the code's ``step_size``, scaling ``2 / (t + 2)``)."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float = 1.0) -> None:
        if not 0 < lr <= 1:
            raise AdamergeError(f"optim.lr={lr}: the Frank-Wolfe step size must be in (0, 1] to stay inside the hull")
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                t = state.get("step", 0)
                gamma = group["lr"] * 2.0 / (t + 2)
                vertex = linear_oracle(p.grad.reshape(p.shape[0], -1).float()).reshape(p.shape)
                p.add_(gamma * (vertex.to(p.dtype) - p))
                state["step"] = t + 1
        return loss
