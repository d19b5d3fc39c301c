"""Concrete masks over the task vectors (Concrete subspace learning, arXiv 2312.06173).

A learned binary mask ``m`` selects, per element of every merged tensor, whether the task vectors
are merged there: ``W0 + sum_k c_k * (m ⊙ tau_k)``. The mask is one Bernoulli variable per element
(logits trainable beside the coefficients), learned through its Concrete (Gumbel-sigmoid) relaxation
``sigmoid((logit + log u - log(1 - u)) / temperature)``, ``u ~ U(0, 1)``: a sample in (0, 1) with a
gradient. While the mask learns, each training step draws one relaxed sample (``merge_once`` shares
it between the tasks' batches); at every other time (evaluation, the fold, a refold) it is hard:
the Bernoulli's mode, ``1`` where ``logit >= 0``, else ``0``.

Defaults are FusionBench's (github.com/tanganke/fusion_bench,
``fusion_bench/method/concrete_subspace/clip_concrete_task_arithmetic.py`` and
``clip_concrete_adamerging.py``, ``fusion_bench/models/masks/mask_model.py``): one mask shared by
all tasks, logits initialized to 0, temperature 0.5, Adam at lr 1e-3, and each sample divided by
its mean over the tensor (``m / mean(m)``), which keeps the merge's scale while elements are
dropped. Two differences: that code evaluates with one more random sample of the mask
(``eval_mask_type: continuous``), here the fold applies the hard mask, so that a checkpoint and its
refold are deterministic; and its Concrete AdaMerging learns the mask against coefficients after one
inner Adam step (lr 1, from their init, reset every step), here the mask learns at the coefficients'
init (as its Concrete Task Arithmetic does) and the coefficients then learn under the hard mask
(``steps``), or both learn together (``steps: null``), with one optimizer and no inner loop.

Cost: one fp32 logit per element of every merged tensor (K per element for ``per_task``), plus its
optimizer state, and merges that are elementwise (no GEMV over the experts, LoRA factors densified).
Parameters that learn in one phase only leave the others without gradient: under DDP use
``trainer.strategy=ddp_find_unused_parameters_true`` with ``steps``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from adamerge.errors import AdamergeError
from adamerge.tensors import TensorInfo

KINDS = ("shared", "per_task")
log = logging.getLogger(__name__)
STATE_PREFIX = "mask."  # keys of the saved logits, after the granularity's prefix


def relaxed_bernoulli(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """One reparameterized Concrete sample in (0, 1), differentiable in ``logits`` (the distribution
    FusionBench's ``MaskModel`` samples)."""
    return torch.distributions.RelaxedBernoulli(temperature=torch.tensor(temperature, device=logits.device),
                                                logits=logits).rsample()


def hard_mask(logits: torch.Tensor) -> torch.Tensor:
    """The Bernoulli's mode: keep where ``sigmoid(logit) >= 1/2``; a logit still at 0 keeps its element."""
    return (logits >= 0).to(logits.dtype)


def rescaled(mask: torch.Tensor) -> torch.Tensor:
    """``m / mean(m)`` per mask (over each expert's slice for per-task masks); an all-zero mask stays zero."""
    mean = mask.reshape(mask.shape[0], -1).mean(1).clamp_min(torch.finfo(mask.dtype).tiny)
    return mask / mean.view(-1, *[1] * (mask.dim() - 1))


class ConcreteMask(nn.Module):
    """Mask logits for every merged tensor, ``(1, *shape)`` (shared) or ``(K, *shape)`` (per task).

    Args:
        kind: ``shared`` (one mask for all experts, the paper's) or ``per_task``.
        temperature: of the Concrete relaxation.
        init_logits: every logit's start (0: keep probability 1/2, and a hard mask that keeps everything).
        rescale: divide the mask by its mean over the tensor, relaxed and hard alike.
        steps: the mask learns alone (coefficients fixed) for this many steps, then is hard and fixed while
            the coefficients learn; ``null``: mask and coefficients learn together for the whole run.
        lr: the logits' learning rate (``null``: ``optim.lr``).
    """

    def __init__(self, kind: str = "shared", temperature: float = 0.5, init_logits: float = 0.0,
                 rescale: bool = True, steps: int | None = None, lr: float | None = None) -> None:
        super().__init__()
        if kind not in KINDS:
            raise AdamergeError(f"granularity.mask.kind={kind!r}; choose from {list(KINDS)}")
        for key, value in (("temperature", temperature), ("lr", lr)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                                      or not math.isfinite(value) or value <= 0):
                raise AdamergeError(f"granularity.mask.{key}={value!r} must be a finite number > 0")
        if isinstance(init_logits, bool) or not isinstance(init_logits, int | float) or not math.isfinite(init_logits):
            raise AdamergeError(f"granularity.mask.init_logits={init_logits!r} must be a finite number")
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
            raise AdamergeError(f"granularity.mask.steps={steps!r} must be an integer >= 0 or null")
        self.kind, self.temperature, self.init_logits = kind, float(temperature), float(init_logits)
        self.rescale, self.steps, self.lr = bool(rescale), steps, lr
        self.logits = nn.ParameterDict()  # tensor name (dots as /) -> logits
        self.learning = False  # a relaxed sample per step (set per step by ``begin_step``, reset by ``finish``)
        self.coefficients_fixed = False  # the mask learns alone: no gradient reaches the coefficients

    def setup(self, experts: Sequence[str], infos: Sequence[TensorInfo]) -> None:
        rows = 1 if self.kind == "shared" else len(experts)
        for info in infos:
            self.logits[key(info.name)] = nn.Parameter(torch.full((rows, *info.shape), self.init_logits))

    def begin_step(self, step: int) -> None:
        """Training step ``step`` starts: the mask learns (relaxed) during its steps, else it is hard."""
        self.learning = self.steps is None or step < self.steps
        self.coefficients_fixed = self.learning and self.steps is not None

    def finish(self) -> None:
        """Training is over: hard from now on (evaluation, fold)."""
        self.learning = self.coefficients_fixed = False
        log.info("Concrete mask (%s): the hard mask keeps %.1f%% of the task vectors' elements", self.kind,
                 100 * self.density())

    def value(self, name: str) -> torch.Tensor:
        """The mask of tensor ``name``: a relaxed sample while it learns under autograd, else hard."""
        logits = self.logits[key(name)]
        if self.learning and torch.is_grad_enabled():
            mask = relaxed_bernoulli(logits, self.temperature)
        else:
            mask = hard_mask(logits.detach())
        return rescaled(mask) if self.rescale else mask

    def apply(self, name: str, coef: torch.Tensor) -> torch.Tensor:
        """Broadcast coefficients ``(K, ...)`` times the mask: ``(K, *shape)`` elementwise coefficients."""
        return (coef.detach() if self.coefficients_fixed else coef) * self.value(name)

    def density(self) -> float:
        """Fraction of elements the hard mask keeps (over all tensors and experts)."""
        kept = sum(int((p >= 0).sum()) for p in self.logits.values())
        return kept / max(sum(p.numel() for p in self.logits.values()), 1)

    def state_tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """The logits, keyed ``<prefix>mask.<tensor name>``: what a refold needs to rebuild the hard mask."""
        return {f"{prefix}{STATE_PREFIX}{name.replace('/', '.')}": p.detach() for name, p in self.logits.items()}

    @torch.no_grad()
    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor], prefix: str = "") -> None:
        for name, p in self.logits.items():
            saved = tensors.get(f"{prefix}{STATE_PREFIX}{name.replace('/', '.')}")
            if saved is None or saved.shape != p.shape:
                raise AdamergeError(f"the saved coefficients hold no mask logits of shape {tuple(p.shape)} "
                                    f"for {name.replace('/', '.')!r}")
            p.copy_(saved)


def key(name: str) -> str:
    return name.replace(".", "/")


def build_mask(options: Mapping | str | None, space: str) -> ConcreteMask | None:
    """``granularity.mask``: null / ``none`` (no mask), ``shared`` / ``per_task``, or a mapping of options."""
    if options in (None, "none", False):
        return None
    if isinstance(options, str):
        options = {"kind": options}
    if not isinstance(options, Mapping):
        raise AdamergeError(f"granularity.mask must be null, a kind {list(KINDS)} or a mapping, got {options!r}")
    if space != "task_vectors":
        raise AdamergeError("granularity.mask masks the task vectors: it needs granularity.space=task_vectors")
    try:
        return ConcreteMask(**options)
    except TypeError as e:
        raise AdamergeError(f"granularity.mask: {e}") from e


def param_groups(params: Mapping[str, nn.Parameter], mask: ConcreteMask | None) -> list:
    """The optimizer's parameters: the mask logits in a group of their own where ``mask.lr`` is set."""
    if mask is None or mask.lr is None:
        return list(params.values())
    logits = {id(p) for p in mask.parameters()}
    rest = [p for p in params.values() if id(p) not in logits]
    return [{"params": rest}, {"params": [p for p in params.values() if id(p) in logits], "lr": mask.lr}]
