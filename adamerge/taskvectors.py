"""Stacked task vectors ``tau[k] = W_k - W0`` and the classic preprocessing transforms on them.

A merged tensor's task vectors are either a dense stack of shape ``(K, *shape)`` or, when every
expert changing it is a LoRA adapter, the adapters' factors (``LoraFactors``), densified only where
a consumer needs dense values (preprocessing, some granularities), with a log line saying so.
Each preprocessing transform is a pure function on one dense stack: the sparsifiers (TIES, DARE, ...)
treat every expert's slice separately, per tensor (mergekit, peft), or at ``scope=model`` on the whole
model flattened into one stack (the TIES reference code; this holds one extra copy of the task vectors
while it runs). The spectral transforms (TSV-M, ISO-C, ISO-CTS: ``adamerge/spectral.py``) and the
Consensus mask work per tensor across experts, and ``then`` chains further ones after ``method``
(Consensus on top of TIES, as arXiv 2405.07813 does).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch

from adamerge.errors import AdamergeError
from adamerge.spectral import SPECTRAL
from adamerge.tensors import TensorInfo
from adamerge.vocab import AddedRows

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
    host memory and are streamed to the compute device per tensor (``pool.offload=cpu``). ``base``:
    W0 of each merged tensor (the base's own parameters, no copy), for transforms that need weights (SLERP).
    """

    experts: list[str]
    infos: dict[str, TensorInfo]
    stacks: dict[str, torch.Tensor]
    heads: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # expert -> its task head
    head_configs: dict[str, object] = field(default_factory=dict)  # expert -> its config (label names)
    factors: dict[str, LoraFactors] = field(default_factory=dict)
    offloaded: bool = False
    base: dict[str, torch.Tensor] = field(default_factory=dict)
    added: AddedRows | None = None  # the rows of tokens experts added: constants the fold writes (vocab.py)

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


# ---- preprocessing: sparsify each expert, optionally elect signs, optionally normalize --------------
#
# Two conventions, one switch (``pool.preprocess.convention``):
# - ``paper``: the papers' released code. TIES follows its reference (prateeky2806/ties-merging
#   src/utils/merge_utils.py ``topk_values_mask``/``resolve_sign("mass")``/``disjoint_merge``; FusionBench
#   fusion_bench/method/ties_merging/ties_merging_utils.py): one threshold over each expert's whole
#   flattened task vector, the ``k = n - int(density n)``-th smallest |tau| kept with everything
#   above it, the sign elected on the unweighted trimmed sum (an exact 0 takes the sign that the
#   elected signs mostly have), the disjoint mean dividing by the number of agreeing experts.
#   DARE rescales by 1/(1-p), DELLA by 1/p_keep (arXiv 2311.03099 Sec. 4.1, 2406.11617 Sec. 3.1).
# - ``mergekit``: mergekit 0.1.5 (mergekit/sparsify.py, merge_methods/generalized_task_arithmetic.py):
#   per tensor, ``max(1, int(density n))`` kept, breadcrumbs ``int()`` counts, signs elected on the
#   *weighted* deltas (+ on an exact 0), normalization by the agreeing experts' weights, DARE/DELLA
#   rescaled to keep each expert's L1 norm, DELLA ranking within rows.
# The per-expert weights are the task coefficients the merge will use (``pool.preprocess.weights``,
# by default ``granularity.init``), so ``W0 + sum_k w_k tau'_k`` is mergekit's merge with ``lambda=1``;
# mergekit's ``lambda`` is ``granularity.init = lambda * w`` with ``pool.preprocess.weights = w``.

CONVENTIONS = ("paper", "mergekit")
SCOPES = ("tensor", "model")
# method -> (sparsifier, sign consensus); the names are mergekit's merge methods
METHODS: dict[str, tuple[str, bool]] = {
    "ties": ("magnitude", True),
    "dare": ("random", False),
    "dare_linear": ("random", False),
    "dare_ties": ("random", True),
    "breadcrumbs": ("outliers", False),
    "breadcrumbs_ties": ("outliers", True),
    "della": ("magprune", True),
    "della_linear": ("magprune", False),
}
RANDOM = ("random", "magprune")
L1_EPS = 1e-7  # mergekit's rescaled_masked_tensor: below this norm nothing is rescaled


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise AdamergeError(f"{name}={value} must be within [0, 1]")


def ranks_along(values: torch.Tensor, dim: int) -> torch.Tensor:
    """Rank of each value along ``dim``, 0 (smallest) .. n - 1; equal values in index order."""
    return values.argsort(dim=dim, stable=True).argsort(dim=dim)


def integer_ranks(stack: torch.Tensor) -> torch.Tensor:
    """Rank of |tau| within each expert's slice, 0 (smallest) .. n - 1, shape of ``stack``."""
    return ranks_along(stack.flatten(1).abs(), 1).view_as(stack)


def magnitude_ranks(stack: torch.Tensor) -> torch.Tensor:
    """Rank of |tau| within each expert's slice, scaled to [0, 1] (0 = smallest)."""
    n = stack[0].numel() if stack.dim() else 1
    return integer_ranks(stack).to(torch.float32) / max(n - 1, 1)


def row_ranks(stack: torch.Tensor) -> torch.Tensor:
    """mergekit's DELLA ranks: within each row (dim 1 of a tensor; a 1-D tensor is one row), in [0, 1]."""
    rows = stack.view(stack.shape[0], 1, -1) if stack.dim() < 3 else stack
    return (ranks_along(rows.abs(), 2).to(torch.float32) / max(rows.shape[2] - 1, 1)).view_as(stack)


def l1_rescaled(stack: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """mergekit's ``rescaled_masked_tensor`` with the L1 norm: each expert's kept entries scaled back
    to the L1 norm its slice had (left alone where either norm is below 1e-7)."""
    before = stack.abs().flatten(1).sum(1)
    after = kept.abs().flatten(1).sum(1)
    scale = torch.where((before < L1_EPS) | (after < L1_EPS), torch.ones_like(before), before / after)
    return kept * scale.view(-1, *[1] * (stack.dim() - 1)).to(kept.dtype)


def keep_top(stack: torch.Tensor, density: float, convention: str = "paper") -> torch.Tensor:
    """TIES' trim: the largest-magnitude entries of each expert's slice, the rest zeroed.

    paper: entries at or above the ``n - int(density n)``-th smallest |tau| (``int(density n) + 1``
    of distinct values; all at density 1). mergekit: the ``max(1, int(density n))`` largest; none at 0.
    """
    _check_fraction("density", density)
    n = stack[0].numel()
    if density >= 1.0 or n == 0:
        return stack
    if convention == "mergekit":
        if density <= 0.0:
            return torch.zeros_like(stack)
        keep = integer_ranks(stack) >= n - max(1, int(density * n))
    else:
        flat = stack.flatten(1).abs()
        kth = flat.kthvalue(max(n - int(density * n), 1), dim=1, keepdim=True).values
        keep = (flat >= kth).view_as(stack)
    return torch.where(keep, stack, torch.zeros_like(stack))


def breadcrumbs(stack: torch.Tensor, density: float = 0.9, gamma: float = 0.01,
                convention: str = "paper") -> torch.Tensor:
    """Model Breadcrumbs (arXiv 2312.06795, Sec. 3): drop both tails of the magnitude distribution.

    The ``gamma`` fraction of largest entries (outliers) and everything below the next ``density``
    fraction are zeroed, per expert slice. paper: ``round()`` counts, ``density + gamma <= 1``.
    mergekit: ``int(density n)`` kept, ``int(gamma n)`` outliers, fewer outliers dropped where both
    do not fit, the whole slice kept at density 1.
    """
    _check_fraction("density", density)
    _check_fraction("gamma", gamma)
    n = stack[0].numel()
    ranks = integer_ranks(stack)
    if convention == "mergekit":
        if density >= 1.0:
            return stack
        kept = int(density * n)
        bottom = max(0, n - kept - int(gamma * n))
        keep = (ranks >= bottom) & (ranks < bottom + kept)
    else:
        if density + gamma > 1.0:
            raise AdamergeError(f"breadcrumbs needs density + gamma <= 1, got {density} + {gamma}")
        top = n - round(gamma * n)  # ranks >= top are the outliers
        keep = (ranks < top) & (ranks >= top - round(density * n))
    return torch.where(keep, stack, torch.zeros_like(stack))


def uniform_draw(stack: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """The random contract of DARE and DELLA: one ``torch.rand(stack.shape, generator)`` per stack (on
    the CPU, then moved), so that a seed gives the same masks on any device."""
    return torch.rand(stack.shape, generator=generator).to(stack.device)


def dare(stack: torch.Tensor, p: float = 0.9, generator: torch.Generator | None = None,
         convention: str = "paper", rescale: bool = True) -> torch.Tensor:
    """DARE (arXiv 2311.03099, Sec. 4.1): drop each entry with probability p (kept where the uniform
    draw is ``>= p``), rescale the rest: paper by 1/(1-p), mergekit to the slice's L1 norm."""
    _check_fraction("p", p)
    if p <= 0.0:
        return stack
    if p >= 1.0:
        return torch.zeros_like(stack)
    kept = torch.where(uniform_draw(stack, generator) >= p, stack, torch.zeros_like(stack))
    if not rescale:
        return kept
    return l1_rescaled(stack, kept) if convention == "mergekit" else kept / (1.0 - p)


def della(stack: torch.Tensor, density: float = 0.3, epsilon: float = 0.1, generator: torch.Generator | None = None,
          convention: str = "paper", rescale: bool = True) -> torch.Tensor:
    """DELLA's MagPrune (arXiv 2406.11617, Sec. 3.1): larger entries are kept with higher probability.

    Keep probabilities rise linearly with the magnitude rank (paper: over the slice; mergekit: within
    each row) from ``density - epsilon`` to ``density + epsilon``; an entry is kept where the uniform
    draw is below it. Kept entries are rescaled: paper by 1/p_keep (the expectation is unchanged),
    mergekit to the slice's L1 norm.
    """
    _check_fraction("density", density)
    if not epsilon >= 0.0:  # a negative epsilon would keep small entries more often than large ones
        raise AdamergeError(f"della needs epsilon >= 0, got {epsilon}")
    if convention == "mergekit" and (density >= 1.0 or density <= 0.0):
        return stack if density >= 1.0 else torch.zeros_like(stack)
    inside = density - epsilon > 0.0 and (density + epsilon < 1.0 if convention == "mergekit" else
                                          density + epsilon <= 1.0)
    if not inside:
        raise AdamergeError(f"della needs 0 < density - epsilon and density + epsilon <= 1 (mergekit: < 1), "
                            f"got {density}, {epsilon}")
    ranks = row_ranks(stack) if convention == "mergekit" else magnitude_ranks(stack)
    p_keep = (density - epsilon) + ranks * 2 * epsilon
    kept = torch.where(uniform_draw(stack, generator) < p_keep, stack, torch.zeros_like(stack))
    if not rescale:
        return kept
    return l1_rescaled(stack, kept) if convention == "mergekit" else kept / p_keep.to(stack.dtype)


def agreeing(sparse: torch.Tensor, weights: torch.Tensor | None = None, convention: str = "paper") -> torch.Tensor:
    """TIES' sign election: which entries agree with the elected sign (zeros never do).

    paper: the sign of the trimmed sum; an exact 0 takes the sign of the sum of all elected signs of
    the stack (``resolve_zero_signs``). mergekit: the sign of the sum of the *weighted* deltas, + on 0.
    """
    if convention == "mergekit":
        weighted = sparse * _expert_view(weights, sparse)
        elected = torch.where(weighted.sum(0) >= 0, 1.0, -1.0).to(sparse.dtype)
        return torch.sign(weighted) == elected
    elected = torch.sign(sparse.sum(0))
    elected = torch.where(elected == 0, torch.sign(elected.sum()), elected)
    return torch.where(elected > 0, sparse > 0, sparse < 0)


def _expert_view(weights: torch.Tensor | None, stack: torch.Tensor) -> torch.Tensor:
    """``(K,)`` weights (default 1 each) viewed to broadcast against a ``(K, *shape)`` stack."""
    if weights is None:
        weights = torch.ones(stack.shape[0])
    return weights.to(device=stack.device, dtype=stack.dtype).view(-1, *[1] * (stack.dim() - 1))


def disjoint_divisor(kept: torch.Tensor, agree: torch.Tensor | None, weights: torch.Tensor | None,
                     convention: str = "paper") -> torch.Tensor:
    """What each entry's merge is divided by for a (disjoint) mean.

    paper (``disjoint_merge``, mean): the number of experts whose kept entry is nonzero (at least 1).
    mergekit (``normalize``): the sum of the agreeing experts' weights, or with no sign election of
    all experts' weights; 1 where that is 0.
    """
    if convention == "mergekit":
        w = _expert_view(weights, kept)
        if agree is None:
            total = w.sum(0).expand(kept.shape[1:])
            return torch.where(total.abs() < 1e-8, torch.ones_like(total), total)
        total = (w * agree.to(kept.dtype)).sum(0)
        return torch.where(total == 0, torch.ones_like(total), total)
    return (kept != 0).sum(0).clamp(min=1).to(kept.dtype)


def ties(stack: torch.Tensor, density: float = 0.2, disjoint_mean: bool = False, convention: str = "paper",
         weights: torch.Tensor | None = None) -> torch.Tensor:
    """TIES-Merging (arXiv 2306.01708, Sec. 3): trim, elect sign, keep entries that agree.

    With ``disjoint_mean`` every kept entry is divided so that ``sum_k w_k tau'_k`` is the paper's
    disjoint mean (mergekit: the agreeing weights' mean); without it the stack feeds learned
    coefficients directly (AdaMerging++, arXiv 2310.02575).
    """
    return combine(keep_top(stack, density, convention), True, disjoint_mean, convention, weights)


def combine(sparse: torch.Tensor, consensus: bool, disjoint_mean: bool, convention: str,
            weights: torch.Tensor | None) -> torch.Tensor:
    """Sparsified stack -> what the coefficients multiply: agreeing entries only (``consensus``),
    divided by ``disjoint_divisor`` (``disjoint_mean``)."""
    agree = agreeing(sparse, weights, convention) if consensus else None
    kept = sparse if agree is None else torch.where(agree, sparse, torch.zeros_like(sparse))
    return kept / disjoint_divisor(kept, agree, weights, convention) if disjoint_mean else kept


def consensus(stack: torch.Tensor, raw: torch.Tensor, min_agree: int = 2, tall_lambda: float = 0.6) -> torch.Tensor:
    """Consensus merging (arXiv 2405.07813, Sec. 4): keep the entries that at least ``min_agree`` tasks'
    TALL masks need, zero the rest in every expert's slice.

    Task t's TALL mask keeps the entries where the multi-task vector ``tau_mt = sum_k stack[k]`` (task
    arithmetic, or what ``method`` made, e.g. TIES' disjoint sum) is too far from the task's own
    vector: ``|tau_t| > tall_lambda * |tau_mt - tau_t|`` with ``tau_t`` the raw task vector. Followed:
    github.com/nik-dim/tall_masks (as copied in github.com/danielm1405/iso-merging,
    src/utils/tallmask_utils.py ``generate_task_masks``, ``construct_consensus_mask``); the papers pick
    ``tall_lambda`` per task on validation data from {0.2, ..., 0.6}; data-free, 0.6 is FusionBench's
    default (config/method/tall_mask/task_arithmetic.yaml).
    """
    merged = stack.sum(0)
    masks = raw.abs() > tall_lambda * (merged - raw).abs()
    keep = masks.sum(0) >= min_agree
    return torch.where(keep, stack, torch.zeros_like(stack))


def slerp(stack: torch.Tensor, w0: torch.Tensor, t: float = 0.5, dot_threshold: float = 0.9995,
          eps: float = 1e-8) -> torch.Tensor:
    """SLERP of two experts' weights, as mergekit defines it (arXiv 2403.13257; github.com/arcee-ai/mergekit,
    mergekit/merge_methods/slerp.py ``slerp``): ``W = a W_A + b W_B`` per tensor with
    ``a = sin((1 - t) theta) / sin(theta)``, ``b = sin(t theta) / sin(theta)``, theta the angle between the
    two weight tensors (norms below ``eps`` taken as 1), linear interpolation where ``|cos| > 0.9995``;
    fp32. Expert 0 is mergekit's ``base_model`` (``t = 0`` gives it). As task vectors
    ``W - W0 = a tau_A + b tau_B + (a + b - 1) W0``: piece k is its own term plus half of the last one,
    so coefficients 1 give the SLERP."""
    if stack.shape[0] != 2:
        raise AdamergeError(f"slerp merges exactly two experts, got {stack.shape[0]}")
    base = w0.to(device=stack.device, dtype=torch.float32).flatten()
    a, b = (base + stack[k].flatten().float() for k in range(2))
    norm_a, norm_b = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    dot = ((a / torch.where(norm_a > eps, norm_a, 1.0)) * (b / torch.where(norm_b > eps, norm_b, 1.0))).sum()
    dot = dot.clamp(-1.0, 1.0)
    if dot.abs() > dot_threshold:
        coef_a, coef_b = torch.tensor(1.0 - t), torch.tensor(float(t))
    else:
        theta = torch.acos(dot)
        coef_a, coef_b = torch.sin((1 - t) * theta) / torch.sin(theta), torch.sin(t * theta) / torch.sin(theta)
    shared = (coef_a + coef_b - 1) / 2 * base
    pieces = torch.stack([coef_a * stack[0].flatten().float() + shared, coef_b * stack[1].flatten().float() + shared])
    return pieces.view_as(stack).to(stack.dtype)


def min_max(x: torch.Tensor) -> torch.Tensor:
    """Each row scaled to [0, 1] by its min and max (PCB's ``normalize(x, dim=1)``); a constant row is 0
    (an expert that left a tensor unchanged), where that code divides by zero."""
    low, high = x.min(1, keepdim=True).values, x.max(1, keepdim=True).values
    span = high - low
    return torch.where(span > 0, (x - low) / torch.where(span > 0, span, 1.0), 0.0)


def clamp_quantiles(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """PCB's ``clamp``: each row clamped between its sorted values at ``int(d low)`` and ``int(d (1 - high)) - 1``."""
    d = x.shape[1]
    lo = x.kthvalue(int(d * low) + 1, dim=1, keepdim=True).values
    hi = x.kthvalue(int(d * (1 - high) - 1) + 1, dim=1, keepdim=True).values
    return torch.minimum(torch.maximum(x, lo), hi)


def pcb(stack: torch.Tensor, ratio: float = 0.1) -> torch.Tensor:
    """PCB-Merging, parameter competition balancing (arXiv 2410.02396, Sec. 3): score every entry by
    intra-balancing ``exp(K * minmax(|tau_k|)^2)`` times inter-balancing ``tanh(tau_k * sum_j tau_j)``,
    keep each expert's top ``ratio`` scores (min-max scaled, the rest 0), and merge the magnitude-
    clipped task vectors (0.01% tails) as the score-weighted mean. Piece k is ``tau_k s_k / sum_j s_j``,
    so coefficients 1 give that mean. Followed: github.com/duguodong7/pcb-merging, pcb-merging.py
    ``PCB_merge`` (the README's reference for the method), over each expert's whole flattened slice.
    Memory: about six fp32 copies of the stack while it runs (of the whole model at ``scope=model``, the
    code's choice; ``scope=tensor`` ranks per tensor and holds them for one tensor at a time).
    """
    _check_fraction("pcb_ratio", ratio)
    k, flat = stack.shape[0], stack.flatten(1).float()
    magnitude = clamp_quantiles(flat.abs(), 0.0001, 0.0001)
    clipped = torch.sign(flat) * magnitude
    scores = torch.exp(k * min_max(magnitude) ** 2) * torch.tanh(flat * flat.sum(0))
    ranked = scores.kthvalue(min(int(flat.shape[1] * (1 - ratio)), flat.shape[1] - 1) + 1, dim=1, keepdim=True).values
    scale = min_max(torch.maximum(scores, ranked))
    pieces = clipped * scale / scale.sum(0).clamp(min=1e-12)
    return pieces.view_as(stack).to(stack.dtype)


def model_stock(stack: torch.Tensor) -> torch.Tensor:
    """Model Stock (arXiv 2403.19522, Eq. 2): ``W0 + t * mean_k tau_k`` with ``t = K cos / ((K - 1) cos + 1)``,
    ``cos`` the cosine of the angle between two experts' task vectors of this tensor (for K > 2 the mean
    pairwise angle). Piece k is ``t tau_k / K`` (coefficients 1). Followed: FusionBench
    (github.com/tanganke/fusion_bench, fusion_bench/method/model_stock/model_stock.py: angles in fp32,
    ``eps = 1e-8``), which extends the paper's two-model code (github.com/naver-ai/model-stock)."""
    k, flat = stack.shape[0], stack.flatten(1).float()
    if k < 2:
        raise AdamergeError("model_stock needs at least two experts")
    norms = flat.norm(dim=1)
    cos = (flat @ flat.T) / (norms[:, None] * norms[None, :] + 1e-8)
    pairs = torch.triu_indices(k, k, offset=1, device=flat.device)
    angle = torch.arccos(cos[pairs[0], pairs[1]].clamp(-1.0, 1.0)).mean()
    ratio = k * torch.cos(angle) / ((k - 1) * torch.cos(angle) + 1 + 1e-8)
    return (stack.float() * ratio / k).to(stack.dtype)


# transforms across experts, per tensor: (options, processed stack, raw stack, W0 or None) -> stack
TRANSFORMS: dict[str, Callable[[Preprocess, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]] = {
    "tsv": lambda spec, stack, raw, w0: SPECTRAL["tsv"](stack),
    "iso_c": lambda spec, stack, raw, w0: SPECTRAL["iso_c"](stack),
    "iso_cts": lambda spec, stack, raw, w0: SPECTRAL["iso_cts"](stack, common_fraction=spec.common_fraction),
    "consensus": lambda spec, stack, raw, w0: consensus(stack, raw, spec.min_agree, spec.tall_lambda),
    "star": lambda spec, stack, raw, w0: SPECTRAL["star"](stack, spec.eta),
    "model_stock": lambda spec, stack, raw, w0: model_stock(stack),
    "slerp": lambda spec, stack, raw, w0: slerp(stack, w0, spec.slerp_t),
}
# transforms over each expert's slice that also run on the whole flattened model (``scope=model``)
SLICE_TRANSFORMS = {"pcb": lambda spec, stack: pcb(stack, spec.pcb_ratio)}


@dataclass(frozen=True)
class Preprocess:
    """``pool.preprocess``: sparsify (``METHODS``), elect signs where the method does, normalize.

    ``scope=model`` treats each expert's whole task vector as one tensor (one threshold, one rank
    order, one L1 norm); null takes the convention's own: the TIES reference's ``model`` for paper
    TIES, ``tensor`` otherwise. ``rescale`` null: mergekit's defaults (on for DARE and DELLA, off for
    TIES and breadcrumbs); under the paper convention only DARE and DELLA rescale.
    ``weights``: the per-expert weights of mergekit's sign election and normalization: a number, a
    mapping expert -> number, ``uniform`` (1/K) or null (1 each); the paper convention ignores them.
    ``then``: transforms (``TRANSFORMS``) applied per tensor after ``method``, in order.
    """

    method: str = "none"
    convention: str = "paper"
    scope: str | None = None
    density: float = 0.2
    p: float = 0.9
    epsilon: float = 0.1
    gamma: float = 0.01
    disjoint_mean: bool = False
    rescale: bool | None = None
    weights: float | str | Mapping[str, float] | None = None
    common_fraction: float = 0.8
    eta: float = 40.0
    pcb_ratio: float = 0.05
    slerp_t: float = 0.5
    min_agree: int = 2
    tall_lambda: float = 0.6
    then: str | Sequence[str] | None = None

    def __post_init__(self) -> None:
        if self.method not in ("none", *METHODS, *TRANSFORMS, *SLICE_TRANSFORMS):
            raise AdamergeError(f"pool.preprocess.method={self.method!r}; choose from none, "
                                f"{', '.join([*METHODS, *TRANSFORMS, *SLICE_TRANSFORMS])}")
        unknown = [s for s in self.steps if s not in TRANSFORMS]
        if unknown:
            raise AdamergeError(f"pool.preprocess.then={unknown[0]!r}; choose from {', '.join(TRANSFORMS)}")
        if self.scope == "model" and self.method in TRANSFORMS:
            raise AdamergeError(f"pool.preprocess.scope=model: {self.method} works per tensor")
        for name, low, high in (("common_fraction", 0, 1), ("pcb_ratio", 0, 1), ("eta", 0, 100), ("slerp_t", 0, 1),
                                ("tall_lambda", 0, math.inf), ("min_agree", 0, math.inf)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
                raise AdamergeError(f"pool.preprocess.{name}={value!r} must be a number within [{low}, {high}]")
        if self.min_agree != int(self.min_agree):
            raise AdamergeError(f"pool.preprocess.min_agree={self.min_agree} must be a whole number of tasks")
        if self.convention not in CONVENTIONS:
            raise AdamergeError(f"pool.preprocess.convention={self.convention!r}; choose from {list(CONVENTIONS)}")
        if self.scope not in (None, *SCOPES):
            raise AdamergeError(f"pool.preprocess.scope={self.scope!r}; choose from null, {', '.join(SCOPES)}")
        if self.rescale and self.convention == "paper" and self.method != "none" and self.sparsifier not in RANDOM:
            raise AdamergeError(f"pool.preprocess.rescale: {self.method} has no rescaling in its paper; "
                                "convention=mergekit rescales to the L1 norm")

    @property
    def steps(self) -> tuple[str, ...]:
        """``then`` as a tuple of transform names."""
        if self.then is None:
            return ()
        return (self.then,) if isinstance(self.then, str) else tuple(self.then)

    @property
    def sparsifier(self) -> str | None:
        return METHODS[self.method][0] if self.method in METHODS else None

    @property
    def elects_signs(self) -> bool:
        return self.method in METHODS and METHODS[self.method][1]

    @property
    def effective_scope(self) -> str:
        if self.scope is not None:
            return self.scope
        paper_whole = self.sparsifier == "magnitude" or self.method in SLICE_TRANSFORMS  # TIES', PCB's code
        return "model" if self.convention == "paper" and paper_whole else "tensor"

    @property
    def effective_rescale(self) -> bool:
        return self.sparsifier in RANDOM if self.rescale is None else bool(self.rescale)

    def expert_weights(self, experts: Sequence[str]) -> torch.Tensor:
        """The ``(K,)`` weights of ``weights`` for these experts."""
        w = self.weights
        if w is None:
            return torch.ones(len(experts))
        if w == "uniform":
            return torch.full((len(experts),), 1.0 / len(experts))
        if isinstance(w, Mapping):
            missing = [e for e in experts if e not in w]
            if missing:
                raise AdamergeError(f"pool.preprocess.weights has no value for expert(s) {missing}")
            return torch.tensor([float(w[e]) for e in experts])
        try:
            return torch.full((len(experts),), float(w))
        except (TypeError, ValueError):
            raise AdamergeError(f"pool.preprocess.weights={w!r}; give a number, a mapping expert -> number "
                                "or uniform") from None

    def sparsify(self, stack: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        kind, convention, rescale = self.sparsifier, self.convention, self.effective_rescale
        if kind in ("magnitude", "outliers"):
            out = (keep_top(stack, self.density, convention) if kind == "magnitude"
                   else breadcrumbs(stack, self.density, self.gamma, convention))
            return l1_rescaled(stack, out) if rescale else out
        if kind == "random":
            return dare(stack, self.p, generator, convention, rescale)
        return della(stack, self.density, self.epsilon, generator, convention, rescale)

    def apply(self, stack: torch.Tensor, weights: torch.Tensor | None = None,
              generator: torch.Generator | None = None) -> torch.Tensor:
        """One ``(K, *shape)`` stack (a tensor, or at model scope the whole flattened model)."""
        if self.method in SLICE_TRANSFORMS:
            return SLICE_TRANSFORMS[self.method](self, stack)
        return combine(self.sparsify(stack, generator), self.elects_signs, self.disjoint_mean, self.convention, weights)


def preprocess(tv: TaskVectors, method: str | None = None, seed: int = 0, **options) -> TaskVectors:
    """Apply ``pool.preprocess`` (``Preprocess``'s fields as keywords): ``method``, then each of ``then``.
    Random methods draw from one generator seeded with ``seed``, one ``uniform_draw`` per tensor in
    ``tv.names`` order (at model scope one for the whole flattened model)."""
    try:
        spec = Preprocess(method=method or "none", **options)
    except TypeError as e:
        raise AdamergeError(f"pool.preprocess: {e}") from e
    if spec.method == "none" and not spec.steps:
        return tv
    dense = tv.densified("preprocessing works on dense values")
    check_base(spec, dense)
    stacks = first_step(spec, dense, seed)
    for step in spec.steps:  # the raw task vectors stay beside the processed ones while these run
        stacks = {n: TRANSFORMS[step](spec, s, dense.stacks[n], dense.base.get(n)) for n, s in stacks.items()}
    return replace(dense, stacks=stacks)


def check_base(spec: Preprocess, tv: TaskVectors) -> None:
    """SLERP reads the base's weights, which task vectors built outside an ``ExpertPool`` may lack."""
    if "slerp" in (spec.method, *spec.steps) and any(n not in tv.base for n in tv.stacks):
        raise AdamergeError("pool.preprocess slerp needs the base's weights: task vectors from "
                            "ExpertPool.task_vectors")


def first_step(spec: Preprocess, dense: TaskVectors, seed: int) -> dict[str, torch.Tensor]:
    """``method`` on every dense stack: a transform or a sparsifier per tensor, or at model scope one
    sparsifier over the whole flattened model."""
    if spec.method == "none":
        return dict(dense.stacks)
    if spec.method in TRANSFORMS:
        return {n: TRANSFORMS[spec.method](spec, s, s, dense.base.get(n)) for n, s in dense.stacks.items()}
    weights = spec.expert_weights(dense.experts)
    if spec.convention == "mergekit" and spec.elects_signs and not bool(weights.any()):
        raise AdamergeError("pool.preprocess.weights are all 0 (they default to granularity.init): mergekit's sign "
                            "election would keep nothing; set pool.preprocess.weights")
    generator = torch.Generator().manual_seed(seed) if spec.sparsifier in RANDOM else None
    names = [n for n in dense.names if n in dense.stacks]
    if spec.effective_scope == "tensor":
        return {n: spec.apply(dense.stacks[n], weights, generator) for n in names}
    flat = spec.apply(torch.cat([dense.stacks[n].flatten(1) for n in names], dim=1), weights, generator)
    pieces = flat.split([dense.stacks[n][0].numel() for n in names], dim=1)
    return {n: piece.reshape(dense.stacks[n].shape) for n, piece in zip(names, pieces, strict=True)}
