"""Stacked task vectors ``tau[k] = W_k - W0`` and the classic preprocessing transforms on them.

A merged tensor's task vectors are either a dense stack of shape ``(K, *shape)`` or, when every
expert changing it is a LoRA adapter, the adapters' factors (``LoraFactors``), densified only where
a consumer needs dense values (preprocessing, some granularities), with a log line saying so.
Each transform is a pure function on one dense stack and treats every expert's slice separately
(per tensor, as peft and mergekit do), so they compose and stream per tensor.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch

from adamerge.errors import AdamergeError
from adamerge.pool import TensorInfo

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoraFactors:
    """LoRA task vectors of one tensor (arXiv 2106.09685): ``tau_k = left[:, R_k] @ right[R_k]``.

    ``R_k`` are the rank slots that expert k owns (``owner == k``); the adapters' ranks are
    concatenated, so ``sum_k c_k tau_k = [c_1 B_1 | ... | c_K B_K] @ [A_1; ...; A_K]`` is one
    matmul. The LoRA scaling is folded into ``left``; an expert without LoRA here owns no slot.
    """

    left: torch.Tensor  # (rows, R)
    right: torch.Tensor  # (R, cols)
    owner: torch.Tensor  # (R,) int64 expert index of each rank slot
    num_experts: int

    def expert(self, k: int) -> torch.Tensor:
        """Expert k's dense ``(rows, cols)`` task vector (teacher mode, fallbacks)."""
        slots = self.owner == k
        return self.left[:, slots] @ self.right[slots]

    def dense(self) -> torch.Tensor:
        """The ``(K, rows, cols)`` stack these factors stand for."""
        return torch.stack([self.expert(k) for k in range(self.num_experts)])

    def sq_norms(self) -> torch.Tensor:
        """``||tau_k||_F^2`` per expert without densifying: ``sum((L^T L) * (R R^T))`` over k's slots."""
        left, right = self.left.float(), self.right.float()
        gram = (left.T @ left) * (right @ right.T)
        same = (self.owner[:, None] == self.owner[None, :]).to(gram.dtype)
        per_slot = (gram * same).sum(1)
        return torch.zeros(self.num_experts, device=gram.device).index_add_(0, self.owner, per_slot)

    def to(self, dtype: torch.dtype | None = None, device: str | torch.device | None = None) -> LoraFactors:
        return replace(self, left=self.left.to(dtype=dtype, device=device),
                       right=self.right.to(dtype=dtype, device=device), owner=self.owner.to(device=device))


@dataclass
class TaskVectors:
    """``stacks[name]`` has shape ``(K, *param.shape)``; row k belongs to ``experts[k]``.

    ``factors[name]`` holds a tensor's task vectors as LoRA factors instead (never both). A merged
    tensor in neither has zero task vectors and is not merged. ``offloaded``: the stacks stay in
    host memory and are streamed to the compute device per tensor (``pool.offload=cpu``).
    """

    experts: list[str]
    infos: dict[str, TensorInfo]
    stacks: dict[str, torch.Tensor]
    heads: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # expert -> its task head
    head_configs: dict[str, object] = field(default_factory=dict)  # expert -> its config (label names)
    factors: dict[str, LoraFactors] = field(default_factory=dict)
    offloaded: bool = False

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    @property
    def names(self) -> list[str]:
        """Merged tensors with task vectors, in parameter order."""
        return [n for n in self.infos if n in self.stacks or n in self.factors]

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> TaskVectors:
        """Apply a stack -> stack function to every tensor (e.g. ``partial(ties, density=0.2)``)."""
        dense = self.densified("preprocessing works on dense values")
        return replace(dense, stacks={n: fn(s) for n, s in dense.stacks.items()})

    def densified(self, why: str, names: Sequence[str] | None = None) -> TaskVectors:
        """Dense stacks for the LoRA factors (of ``names``; default all), logged with ``why``: the
        fallback where factors cannot serve."""
        names = list(self.factors if names is None else names)
        if not names:
            return self
        log.info("LoRA task vectors of %d tensor(s) densified: %s", len(names), why)
        stacks = {**self.stacks, **{n: self.factors[n].dense() for n in names}}
        return replace(self, stacks={n: stacks[n] for n in self.names if n in stacks},
                       factors={n: f for n, f in self.factors.items() if n not in names})

    def to(self, dtype: torch.dtype | None = None, device: str | torch.device | None = None) -> TaskVectors:
        return replace(self, stacks={n: s.to(dtype=dtype, device=device) for n, s in self.stacks.items()},
                       factors={n: f.to(dtype, device) for n, f in self.factors.items()})

    def offload(self) -> TaskVectors:
        """Stacks in host memory, pinned where CUDA can use that for asynchronous copies."""
        pin = torch.cuda.is_available()
        stacks = {n: s.cpu().pin_memory() if pin and not s.is_pinned() else s.cpu() for n, s in self.stacks.items()}
        return replace(self, stacks=stacks, offloaded=True)

    def sq_norms(self) -> dict[str, torch.Tensor]:
        """Squared Frobenius norm of each expert's task vector per tensor, ``(K,)`` each."""
        # fp32 accumulation without an fp32 (or squared) copy of the stack
        sq = {n: torch.linalg.vector_norm(s.flatten(1), dim=1, dtype=torch.float32).square()
              for n, s in self.stacks.items()}
        sq.update({n: f.sq_norms() for n, f in self.factors.items()})
        return {n: sq[n] for n in self.names}

    def norms(self) -> torch.Tensor:
        """Frobenius norm of each expert's whole task vector, shape ``(K,)``."""
        return sum(self.sq_norms().values()).sqrt()


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise AdamergeError(f"{name}={value} must be within [0, 1]")


def integer_ranks(stack: torch.Tensor) -> torch.Tensor:
    """Rank of |tau| within each expert's slice, 0 (smallest) .. n - 1, shape of ``stack``."""
    flat = stack.flatten(1).abs()
    return flat.argsort(dim=1, stable=True).argsort(dim=1).view_as(stack)


def magnitude_ranks(stack: torch.Tensor) -> torch.Tensor:
    """Rank of |tau| within each expert's slice, scaled to [0, 1] (0 = smallest)."""
    n = stack[0].numel() if stack.dim() else 1
    return integer_ranks(stack).to(torch.float32) / max(n - 1, 1)


def keep_top(stack: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``round(density * n)`` largest-magnitude entries of each expert's slice, zero the rest."""
    _check_fraction("density", density)
    n = stack[0].numel()
    return torch.where(integer_ranks(stack) >= n - round(density * n), stack, torch.zeros_like(stack))


def ties(stack: torch.Tensor, density: float = 0.2, disjoint_mean: bool = False) -> torch.Tensor:
    """TIES-Merging (arXiv 2306.01708, Sec. 3): trim, elect sign, keep entries that agree.

    The elected sign of an entry is the sign of the sum of the trimmed values. With
    ``disjoint_mean`` every kept entry is divided by the number of experts that kept it, so the sum
    over experts is the paper's disjoint mean; without it the stack feeds learned coefficients
    directly (AdaMerging++, arXiv 2310.02575).
    """
    trimmed = keep_top(stack, density)
    elected = torch.sign(trimmed.sum(0, keepdim=True))
    agree = (torch.sign(trimmed) == elected) & (trimmed != 0)
    kept = torch.where(agree, trimmed, torch.zeros_like(trimmed))
    if disjoint_mean:
        kept = kept / agree.sum(0, keepdim=True).clamp(min=1).to(kept.dtype)
    return kept


def dare(stack: torch.Tensor, p: float = 0.9, generator: torch.Generator | None = None) -> torch.Tensor:
    """DARE (arXiv 2311.03099, Sec. 4.1): drop each entry with probability p, rescale the rest by 1/(1-p)."""
    _check_fraction("p", p)
    if p == 1.0:
        return torch.zeros_like(stack)
    keep = torch.rand(stack.shape, generator=generator).to(stack.device) >= p
    return torch.where(keep, stack / (1.0 - p), torch.zeros_like(stack))


def della(
    stack: torch.Tensor, density: float = 0.3, epsilon: float = 0.1, generator: torch.Generator | None = None
) -> torch.Tensor:
    """DELLA's MagPrune (arXiv 2406.11617, Sec. 3.1): larger entries are kept with higher probability.

    Keep probabilities rise linearly with the magnitude rank from ``density - epsilon`` to
    ``density + epsilon``; each kept entry is rescaled by ``1 / p_keep`` so the expectation is unchanged.
    """
    _check_fraction("density", density)
    if not epsilon >= 0.0:  # a negative epsilon would keep small entries more often than large ones
        raise AdamergeError(f"della needs epsilon >= 0, got {epsilon}")
    if not (density - epsilon > 0.0 and density + epsilon <= 1.0):
        raise AdamergeError(f"della needs 0 < density - epsilon and density + epsilon <= 1, got {density}, {epsilon}")
    p_keep = density - epsilon + 2 * epsilon * magnitude_ranks(stack)
    keep = torch.rand(stack.shape, generator=generator).to(stack.device) < p_keep
    return torch.where(keep, stack / p_keep.to(stack.dtype), torch.zeros_like(stack))


def breadcrumbs(stack: torch.Tensor, density: float = 0.9, gamma: float = 0.01) -> torch.Tensor:
    """Model Breadcrumbs (arXiv 2312.06795, Sec. 3): drop both tails of the magnitude distribution.

    The ``gamma`` fraction of largest entries (outliers) and everything below the next ``density``
    fraction are zeroed, per expert slice.
    """
    _check_fraction("density", density)
    _check_fraction("gamma", gamma)
    if density + gamma > 1.0:
        raise AdamergeError(f"breadcrumbs needs density + gamma <= 1, got {density} + {gamma}")
    n = stack[0].numel()
    top = n - round(gamma * n)  # ranks >= top are the outliers
    ranks = integer_ranks(stack)
    keep = (ranks < top) & (ranks >= top - round(density * n))
    return torch.where(keep, stack, torch.zeros_like(stack))


PREPROCESSORS: dict[str, Callable[..., torch.Tensor]] = {
    "ties": ties,
    "dare": dare,
    "della": della,
    "breadcrumbs": breadcrumbs,
}


def preprocess(tv: TaskVectors, method: str | None, seed: int = 0, **kwargs) -> TaskVectors:
    """Apply a named preprocessor with its options; random ones draw from one seeded generator."""
    if method in (None, "none"):
        return tv
    if method not in PREPROCESSORS:
        raise AdamergeError(f"unknown task-vector preprocessing {method!r}; choose from {sorted(PREPROCESSORS)}")
    fn = PREPROCESSORS[method]
    if method in ("dare", "della"):
        kwargs["generator"] = torch.Generator().manual_seed(seed)
    return tv.map(lambda s: fn(s, **kwargs))
