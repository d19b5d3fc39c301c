"""DOGE (arXiv 2501.01230): data-free merging as adaptive projective gradient descent.

A shared delta ``delta_p`` per merged matrix corrects the task vectors; expert coefficients are
fixed at ``lambda_k = rho / ||tau_k||_F`` (per coefficient group of the granularity). With
``M = sum_i lambda_i (tau_i + delta) * mask_i`` the loss per matrix is the first-order gap
between the merged model and each expert, with task vectors standing in for the inputs:

    L_p = sum_j sum_rows < tau_j[r], tau_j[r] - M[r] >^2

The gradient of ``delta`` is projected off the shared subspace ``U`` (top singular directions
common to the task vectors) after every backward, ``g <- g - U U^T g``, so the correction does not
undo what the experts share. ``finish`` writes ``(tau_i + delta) * mask_i`` into the merged model,
so the fold, or any other objective run after it (DOGE as a plug-in), uses the adjusted vectors.
"""

from __future__ import annotations

import torch
from torch import nn

from adamerge.errors import AdamergeError
from adamerge.objectives.base import Objective
from adamerge.taskvectors import keep_top


def shared_subspace(stack: torch.Tensor, rank: int | None = None) -> torch.Tensor:
    """Orthonormal ``(rows, k)`` basis: the top ``r // K`` left singular vectors of each ``tau_i``
    (r = the matrix rank bound), concatenated and re-orthogonalized by SVD, keeping the top k
    (default ``r // K``)."""
    k_experts, rows, cols = stack.shape
    per_expert = max(min(rows, cols) // k_experts, 1)
    columns = [torch.linalg.svd(t.float(), full_matrices=False).U[:, :per_expert] for t in stack]
    basis = torch.linalg.svd(torch.cat(columns, 1), full_matrices=False).U
    return basis[:, : (rank or per_expert)]


class Projected(Objective):
    """Args: rho (coefficient scale), mask_density (keep the top fraction of |tau| per expert; None:
    no mask), shared_rank (k of the shared subspace; None: r // K)."""

    needs_data = False
    supports_offload = False  # it rewrites the task vectors themselves, next to the coefficients
    own_tensors, saved_as, saved_what = "deltas", "delta", "DOGE delta"  # task vectors become (tau_i + delta) * mask_i

    def __init__(self, rho: float = 0.07, mask_density: float | None = None, shared_rank: int | None = None,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.rho, self.mask_density, self.shared_rank = rho, mask_density, shared_rank
        self.deltas = nn.ParameterDict()
        self.bases: dict[str, torch.Tensor] = {}
        self.masks: dict[str, torch.Tensor] = {}

    def setup(self, merged, data, tokenizer=None) -> None:
        granularity = merged.granularity
        if granularity.transform != "identity":
            raise AdamergeError("objective=projected sets lambda = rho/||tau|| itself: "
                                "use granularity.transform=identity")
        granularity.load_table(self.adaptive_lambdas(merged))
        granularity.requires_grad_(False)
        self.names = [n for n in merged.names if merged.stack(n).dim() == 3]
        for name in self.names:
            stack = merged.stack(name)
            self.deltas[name.replace(".", "/")] = nn.Parameter(torch.zeros_like(stack[0], dtype=torch.float32))
            self.bases[name] = shared_subspace(stack, self.shared_rank)
            if self.mask_density is not None:
                self.masks[name] = keep_top(stack, self.mask_density) != 0

    def adaptive_lambdas(self, merged) -> dict[str, torch.Tensor]:
        """``rho / ||tau_k||_F`` over the tensors of each coefficient group, as ``(K, 1)``."""
        squares: dict[str, torch.Tensor] = {}
        for name in merged.names:
            group = merged.granularity.keys[name].replace("/", ".")
            sq = merged.stack(name).float().flatten(1).pow(2).sum(1)
            squares[group] = squares.get(group, 0) + sq
        return {group: (self.rho / sq.sqrt().clamp(min=1e-12))[:, None] for group, sq in squares.items()}

    def extra_parameters(self) -> list[nn.Parameter]:
        return list(self.deltas.values())

    def adjusted(self, merged, name: str) -> torch.Tensor:
        """``(tau_i + delta) * mask_i`` for every expert i, shape ``(K, rows, cols)``."""
        stack = merged.stack(name).float() + self.deltas[name.replace(".", "/")]
        return stack * self.masks[name] if name in self.masks else stack

    def task_loss(self, merged, task: str, batch) -> torch.Tensor:
        total = torch.zeros((), device=merged.stack(self.names[0]).device)
        for name in self.names:
            tau = merged.stack(name).float()
            coef = merged.granularity.broadcast(name).float()
            gap = tau - (coef * self.adjusted(merged, name)).sum(0)
            total = total + (tau * gap).sum(-1).pow(2).sum()
        return total

    def after_backward(self, merged) -> None:
        for name in self.names:
            delta = self.deltas[name.replace(".", "/")]
            if delta.grad is not None:
                basis = self.bases[name].to(delta.grad)
                delta.grad.sub_(basis @ (basis.T @ delta.grad))

    @torch.no_grad()
    def finish(self, merged) -> None:
        for name in self.names:
            merged.replace_stack(name, self.adjusted(merged, name).to(merged.stack(name).dtype))
