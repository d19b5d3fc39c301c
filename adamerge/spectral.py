"""Spectral task-vector transforms (SVD per matrix), each a ``(K, *shape)`` stack -> stack function.

Each paper defines one merged task matrix; here it is written as a sum of K per-expert pieces, so that
``W0 + sum_k c_k tau'_k`` with every ``c_k`` at the paper's scaling factor is the paper's merge, and a
learned run can weight the pieces instead (coefficients on top of the transform). Tensors that are
not matrices (biases, norms, conv kernels) take the mean of the task vectors, as the papers' code does
(``tau'_k = tau_k / K``). The SVDs run in fp32; the result is cast back to the stack's dtype.

- TSV-M (Task Singular Vectors, arXiv 2412.00081): keep each task's top ``r // K`` singular triplets,
  orthogonalize the concatenated left and right singular vectors (the nearest orthogonal matrix,
  ``U V^T`` of their SVD), merge with the original singular values. Followed:
  github.com/AntoAndGar/task_singular_vectors, src/utils/TSVM_utils.py
  ``compute_and_sum_svd_mem_reduction``.
- ISO-C (arXiv 2502.04959): the summed task matrix with every singular value replaced by their mean.
  Followed: github.com/danielm1405/iso-merging, src/utils/iso.py ``iso_c``.
- ISO-CTS (same paper): the top singular directions of the sum (``common_fraction`` of the rank),
  plus each task's top directions outside that common subspace, orthogonalized together, with one
  isotropic singular value (their mean). Followed: the same file, ``iso_cts``.
- STAR (arXiv 2502.10339) works on each expert alone: truncate to ``eta`` percent of the nuclear norm
  and rescale (``star``); non-matrices stay as they are.

A matrix is any 2-D tensor (embeddings too, as those repositories treat every 2-D tensor but CLIP's
``text_projection``, which the user can leave out with ``pool.exclude``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch


def nearest_orthogonal(x: torch.Tensor) -> torch.Tensor:
    """``U V^T`` of ``x = U S V^T``: the orthonormal matrix closest to ``x`` (TSV's decorrelation)."""
    u, _, vh = torch.linalg.svd(x, full_matrices=False)
    return u @ vh


def per_matrix(transform: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Lift a transform of one ``(K, m, n)`` fp32 stack to any stack: matrices go through it, other
    tensors become the mean of the task vectors (``tau_k / K`` each)."""

    @functools.wraps(transform)
    def apply(stack: torch.Tensor, **options) -> torch.Tensor:
        if stack.dim() != 3:
            return stack / stack.shape[0]
        return transform(stack.float(), **options).to(stack.dtype)

    return apply


def block_pieces(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, owner: torch.Tensor, k: int) -> torch.Tensor:
    """``(K, m, n)``: piece k is ``u[:, R_k] diag(s[R_k]) vh[R_k]`` over the slots ``R_k`` that expert k
    owns (``owner == k``); slots owned by ``-1`` are shared equally by all experts."""
    shared = owner < 0
    pieces = []
    for expert in range(k):
        weight = torch.where(owner == expert, s, torch.where(shared, s / k, torch.zeros_like(s)))
        pieces.append((u * weight) @ vh)
    return torch.stack(pieces)


@per_matrix
def tsv(stack: torch.Tensor) -> torch.Tensor:
    """TSV-M: per-task rank ``r // K`` (``r = min(m, n)``), decorrelated across tasks; piece k has rank
    at most ``r // K`` and the merge at most ``K * (r // K)``."""
    k, m, n = stack.shape
    keep = min(m, n) // k
    if keep == 0:
        return torch.zeros_like(stack)
    u, s, vh = torch.linalg.svd(stack, full_matrices=False)  # (K, m, r), (K, r), (K, r, n)
    u_cat = u[:, :, :keep].permute(1, 0, 2).reshape(m, k * keep)
    vh_cat = vh[:, :keep].reshape(k * keep, n)
    owner = torch.arange(k, device=stack.device).repeat_interleave(keep)
    return block_pieces(nearest_orthogonal(u_cat), s[:, :keep].reshape(-1),
                        nearest_orthogonal(vh_cat.T).T, owner, k)


@per_matrix
def iso_c(stack: torch.Tensor) -> torch.Tensor:
    """ISO-C: ``sum_k tau_k = U S V^T`` becomes ``mean(S) U V^T``. Piece k is the same spectral map
    applied to ``tau_k`` alone, ``U diag(mean(S) / S) U^T tau_k``, so the pieces sum to the merge and
    a learned run reweights the experts inside that isotropic subspace. Directions of the sum's
    numerical null space (``S <= eps * max(S)``, arbitrary singular vectors) are left out; the
    code gives them the mean too, which only differs for a rank-deficient sum."""
    total = stack.sum(0)
    u, s, _ = torch.linalg.svd(total, full_matrices=False)
    support = s > s.max() * torch.finfo(s.dtype).eps * max(total.shape)
    gain = torch.where(support, s.mean() / s.clamp(min=torch.finfo(s.dtype).tiny), torch.zeros_like(s))
    return (u * gain) @ (u.T @ stack)


def common_size(rank: int, k: int, fraction: float) -> int:
    """ISO-CTS' common subspace: ``fraction`` of the rank, moved so that the rest splits evenly over K
    (the code rounds the task slots per task; capped here at ``rank // K``, where the code's common size
    would turn negative and slice from the end)."""
    common = int(rank * fraction)
    return rank - min(round((rank - common) / k), rank // k) * k


@per_matrix
def iso_cts(stack: torch.Tensor, common_fraction: float = 0.8) -> torch.Tensor:
    """ISO-CTS: common subspace of the sum plus ``(r - common) / K`` task-specific directions per task
    (from each task vector with the common subspace projected out), orthogonalized together, every
    singular value the mean of the kept ones. Piece k: its task-specific directions, plus 1/K of the
    common ones."""
    k, m, n = stack.shape
    rank = min(m, n)
    common = common_size(rank, k, common_fraction)
    per_task = (rank - common) // k
    u, s, vh = torch.linalg.svd(stack.sum(0), full_matrices=False)
    u_c, s_c, vh_c = u[:, :common], s[:common], vh[:common]
    outside = stack - u_c @ (u_c.T @ stack)
    u_t, s_t, vh_t = torch.linalg.svd(outside, full_matrices=False)
    u_cat = torch.cat([u_t[:, :, :per_task].permute(1, 0, 2).reshape(m, k * per_task), u_c], 1)
    vh_cat = torch.cat([vh_t[:, :per_task].reshape(k * per_task, n), vh_c], 0)
    s_cat = torch.cat([s_t[:, :per_task].reshape(-1), s_c])
    owner = torch.cat([torch.arange(k, device=stack.device).repeat_interleave(per_task),
                       torch.full((common,), -1, device=stack.device)])
    flat = s_cat.mean().expand_as(s_cat)  # K * per_task + common = r slots
    return block_pieces(nearest_orthogonal(u_cat), flat, nearest_orthogonal(vh_cat.T).T, owner, k)


def star(stack: torch.Tensor, eta: float = 40.0) -> torch.Tensor:
    """STAR, spectral truncation and rescale (arXiv 2502.10339), per expert and matrix: keep the fewest
    top singular values whose sum reaches ``eta`` percent of the nuclear norm (searchsorted + 1), scale
    them up so that the nuclear norm is unchanged; other tensors are left as they are. The merge then
    averages the experts (``granularity.init=uniform``). Followed: github.com/IBM/STAR, merger/STAR.py
    ``star`` (full SVD), runner/*.py (``--eta 40``, simple average)."""
    if stack.dim() != 3:
        return stack
    u, s, vh = torch.linalg.svd(stack.float(), full_matrices=False)
    total = s.sum(1, keepdim=True)
    kept = torch.searchsorted(s.cumsum(1), total * eta / 100) + 1  # (K, 1) ranks kept
    s = torch.where(torch.arange(s.shape[1], device=s.device) < kept, s, torch.zeros_like(s))
    s = s * total / s.sum(1, keepdim=True).clamp(min=torch.finfo(s.dtype).tiny)
    return ((u * s[:, None, :]) @ vh).to(stack.dtype)


SPECTRAL = {"tsv": tsv, "iso_c": iso_c, "iso_cts": iso_cts, "star": star}
