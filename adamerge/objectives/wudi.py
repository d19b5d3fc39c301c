"""WUDI-Merging (arXiv 2503.08099, "Whoever Started the Interference Should End It"): data-free.

The task vectors of a linear layer approximately span the inputs that layer saw while its expert was
fine-tuned, so the interference a merged delta ``tau_m`` causes on task k's inputs is measured on
``tau_k``'s own rows. Per 2-D matrix:

    L_p = sum_k ||(tau_m - tau_k) tau_k^T||_F^2 / ||tau_k||_F^2

The paper optimizes ``tau_m`` itself, so here the trainable state is one merged delta per matrix (an
objective's own tensors, as DOGE's deltas), started at ``sum_k tau_k`` and moved by Adam; the
coefficients stay frozen at their init and merge every other tensor (the preset: 1/K, the code's
average). Code followed: FusionBench (github.com/tanganke/fusion_bench, fusion_bench/method/wudi/wudi.py,
the authors' loss, init and Adam lr 1e-5 of github.com/nathanielyvo/WUDI-Merging). Adam's update does
not depend on the loss's scale per tensor, so one loss summed over the matrices and one optimizer step
equal the code's separate per-matrix loops run side by side.

``finish`` writes ``tau_k + (tau_m - sum_j c_j tau_j) / sum_j c_j`` as expert k's task vector, so the
fold of the frozen coefficients gives exactly ``W0 + tau_m``, and a learned run continued on the same
merged model (AdaMerging on WUDI-adjusted task vectors) starts from the WUDI merge. Where a matrix has
fewer columns than rows the loss reads the ``(cols x cols)`` Gram ``tau_k^T tau_k`` instead of the
``(rows x rows)`` product (the same value: ``||D tau^T||^2 = <D tau^T tau, D>``), so an embedding's
vocabulary rows cost nothing extra.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

import torch
from torch import nn

from adamerge.errors import AdamergeError
from adamerge.objectives.base import Objective


@torch.no_grad()
def interference_and_grad(merged_delta: torch.Tensor, stack: torch.Tensor, gram: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """``sum_k ||(tau_m - tau_k) tau_k^T||_F^2 / ||tau_k||_F^2`` for one ``(K, rows, cols)`` stack and its gradient
    ``sum_k 2 (tau_m - tau_k) tau_k^T tau_k / ||tau_k||^2``, one expert at a time in fp32 (temporaries of one
    expert's matrix, whatever K is). An expert that left the matrix unchanged (``tau_k = 0``) adds nothing.
    ``gram``: ``tau_k^T tau_k`` per expert, read instead of ``(rows x rows)`` products."""
    loss, grad = torch.zeros((), device=merged_delta.device), torch.zeros_like(merged_delta, dtype=torch.float32)
    for k, tau in enumerate(stack):
        tau = tau.float()
        sq_norm = tau.pow(2).sum()
        if sq_norm == 0:
            continue
        gap = merged_delta.float() - tau
        projected = gap @ gram[k] if gram is not None else (gap @ tau.T) @ tau  # D tau^T tau
        loss += (projected * gap).sum() / sq_norm  # <D tau^T tau, D> = ||D tau^T||^2
        grad += projected.mul_(2 / sq_norm)
    return loss, grad


class Interference(torch.autograd.Function):
    """The loss of one matrix with its gradient computed in forward: autograd keeps one ``(rows, cols)`` tensor
    per matrix instead of the K-sized temporaries of the expression."""

    @staticmethod
    def forward(ctx, merged_delta: torch.Tensor, stack: torch.Tensor, gram: torch.Tensor | None) -> torch.Tensor:
        loss, grad = interference_and_grad(merged_delta, stack, gram)
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad_output * grad, None, None


def _key(name: str) -> str:
    return name.replace(".", "/")


class Wudi(Objective):
    """Args: exclude (globs over tensor names kept out of the optimization, as the code's exclude_keys;
    they are merged by the coefficients)."""

    needs_data = False
    supports_offload = False  # it rewrites the task vectors themselves, next to the coefficients
    own_tensors, saved_as, saved_what = "merged_deltas", "merged_delta", "WUDI merged delta"  # tau_m per matrix

    def __init__(self, exclude: Sequence[str] = (), **kwargs) -> None:
        super().__init__(**kwargs)
        self.exclude = list(exclude)
        self.merged_deltas = nn.ParameterDict()
        self.grams: dict[str, torch.Tensor] = {}
        self.names: list[str] = []

    def optimized(self, merged, name: str) -> bool:
        """A 2-D matrix not excluded: what the code optimizes (every other tensor keeps the coefficients)."""
        return merged.granularity.infos[name].kind == "matrix" and len(merged.granularity.infos[name].shape) == 2 \
            and not any(fnmatch.fnmatchcase(name, pattern) for pattern in self.exclude)

    def setup(self, merged, data, tokenizer=None) -> None:
        merged.granularity.requires_grad_(False)
        self.names = [n for n in merged.names if self.optimized(merged, n)]
        if not self.names:
            raise AdamergeError("objective=wudi found no 2-D matrix to optimize (all excluded by objective.exclude?)")
        for name in self.names:
            stack = merged.stack(name)
            self.merged_deltas[_key(name)] = nn.Parameter(stack.float().sum(0))
            if stack.shape[2] < stack.shape[1]:
                self.grams[name] = torch.stack([tau.float().T @ tau.float() for tau in stack])

    def extra_parameters(self) -> list[nn.Parameter]:
        return list(self.merged_deltas.values())

    def task_loss(self, merged, task: str, batch) -> torch.Tensor:
        losses = [Interference.apply(self.merged_deltas[_key(n)], merged.stack(n), self.grams.get(n))
                  for n in self.names]
        return torch.stack(losses).sum()

    @torch.no_grad()
    def finish(self, merged) -> None:
        """Each expert's task vector shifted by its share of ``tau_m - sum_j c_j tau_j``, so that the frozen
        coefficients fold to ``W0 + tau_m``."""
        for name in self.names:
            stack, coef = merged.stack(name), merged.granularity.broadcast(name).float()
            total = coef.sum(0)
            if not torch.all(total != 0):
                raise AdamergeError(f"objective=wudi: the coefficients of {name!r} sum to 0, so tau_m cannot be "
                                    "written as task vectors; start them elsewhere (granularity.init)")
            residual = self.merged_deltas[_key(name)] - (coef * stack.float()).sum(0)
            merged.replace_stack(name, (stack.float() + residual / total).to(stack.dtype))
