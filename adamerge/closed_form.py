"""Closed-form merges from calibration data (``closed_form.method``): RegMean, MaTS and Fisher merging.

RegMean and Fisher merging are linear in the experts' weights with per-expert matrices that sum to the identity,
``W* = sum_k M_k W_k``, so ``W* = W0 + sum_k M_k tau_k``: each expert's task vector is replaced by its
piece ``M_k tau_k`` and the usual merge ``W0 + sum_k c_k tau'_k`` with every ``c_k = 1`` (the presets'
task granularity, init 1) is the closed form. Learned coefficients then compose on top: a learned run
with ``closed_form.method`` set starts from (with init 1) and rescales each expert's share of the
solution, per task, layer or chunk, as it would plain task vectors. The statistics come from
``adamerge/statistics.py``.

- RegMean (arXiv 2212.09849, "Dataless Knowledge Fusion by Merging Weights of Language Models"):
  per Linear / Conv1D weight, ``W* = (sum_k G~_k)^-1 sum_k G~_k W_k`` (inputs-first layout) with
  ``G_k`` the mean Gram matrix of the layer's inputs on expert k's own data and ``G~_k`` its
  off-diagonal entries scaled by ``alpha``; every other merged tensor is the simple average.
  Followed: FusionBench (github.com/tanganke/fusion_bench, fusion_bench/method/regmean/regmean.py
  ``merging_with_regmean_weights``; config/method/regmean/clip_regmean.yaml and gpt2_regmean.yaml:
  ``reduce_non_diagonal_ratio`` 0.6, 256 examples per expert) and the paper's code
  (github.com/bloomberg/dataless-model-merging, src/model_merge/avg_merger.py ``regmean_mean_params``).
  Solved in fp64 with one factorization per layer (``torch.linalg.solve``; the code inverts).
- Fisher merging (arXiv 2111.09832, "Merging Models with Fisher-Weighted Averaging"): per entry,
  ``theta* = sum_k w_k F~_k theta_k / sum_k w_k F~_k`` with ``F~_k = F_k + 1e-6`` the diagonal Fisher
  and, with ``normalize``, ``w_k`` proportional to ``1 / (||F_k|| + 1e-6)`` (the L2 norm over every
  merged tensor). Followed: FusionBench, fusion_bench/method/fisher_merging/fisher_merging.py
  ``merging_with_fisher_weights``; config/method/fisher_merging/clip_fisher_merging.yaml
  (``normalize_fisher_weight: true``, ``minimal_fisher_weight: 1e-6``, 256 examples).
- MaTS (arXiv 2312.04339, "Merging by Matching Models in Task Parameter Subspaces") with the RegMean
  objective: the same systems solved by conjugate gradient from a task-arithmetic start, stopped after
  ``iterations`` steps. Followed: github.com/r-three/mats, src/merging/conjugateGradient_fisherMerging.py
  ``cg_forward`` and the README's full-model command (``--model_lambda 1.0``, so alpha 1,
  ``--num_iterations 100``, initialization: task vectors with lambda 0.3); other tensors averaged. Its
  result is not linear in the task vectors, so its pieces are the merged delta split evenly, ``D / K``:
  learned coefficients on top rescale the whole solution, not one expert's share of it. The blockwise
  Fisher objective (output-gradient Gram matrices too) needs statistics not gathered here.

Memory while the statistics are gathered (``adamerge plan``): RegMean and MaTS hold one expert's Gram
matrices and their running sum (``2 sum in^2`` fp32 over the solved layers) and one fp32 ``G~_k tau_k``
per expert and layer; Fisher merging one fp32 Fisher per expert and merged tensor. The per-expert parts
are kept beside the task vectors (host memory where they were built there).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch
from torch import nn

from adamerge.errors import AdamergeError
from adamerge.granularity import Task
from adamerge.merged import MergedModel
from adamerge.objectives.base import POSITIONS, Objective
from adamerge.statistics import expert_batches, expert_fisher, expert_grams
from adamerge.taskvectors import TaskVectors
from adamerge.tensors import is_input_first, linear_layers

log = logging.getLogger(__name__)

METHODS = ("none", "regmean", "mats", "fisher")


@dataclass(frozen=True)
class ClosedForm:
    """``closed_form``: the method, the calibration rows each expert runs (``examples`` of its own
    task, as ``positions`` says), RegMean's and MaTS's ``alpha``, MaTS's ``iterations`` and
    ``init_scale`` (task arithmetic's lambda for the start), Fisher merging's ``normalize`` and ``floor``."""

    method: str = "none"
    examples: int = 256
    positions: str = "generated"
    new_tokens: int = 8
    alpha: float = 0.6
    iterations: int = 100
    init_scale: float = 0.3
    normalize: bool = True
    floor: float = 1e-6

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise AdamergeError(f"closed_form.method={self.method!r}; choose from {', '.join(METHODS)}")
        if self.positions not in POSITIONS:
            raise AdamergeError(f"closed_form.positions={self.positions!r}; choose from {list(POSITIONS)}")
        for name, low in (("examples", 1), ("new_tokens", 1), ("iterations", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise AdamergeError(f"closed_form.{name}={value!r} must be a whole number >= {low}")
        for name, low, high in (("alpha", 0, 1), ("floor", 0, math.inf), ("init_scale", -math.inf, math.inf)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
                raise AdamergeError(f"closed_form.{name}={value!r} must be a number within [{low}, {high}]")
        if not isinstance(self.normalize, bool):
            raise AdamergeError(f"closed_form.normalize={self.normalize!r} must be true or false")

    @property
    def enabled(self) -> bool:
        return self.method != "none"


def closed_form_options(cfg: Mapping | None) -> ClosedForm:
    """``closed_form`` as checked options (a misspelled key is an error that names it)."""
    try:
        return ClosedForm(**dict(cfg or {}))
    except TypeError as e:
        raise AdamergeError(f"closed_form: {e}") from e


def require_calibration(spec: ClosedForm, data) -> None:
    """Refuse a closed-form method without calibration data (rows or a data module)."""
    if spec.enabled and data is None:
        raise AdamergeError(f"closed_form.method={spec.method} needs calibration data: set data.paths.TASK=FILE "
                            "for each expert (and an objective that reads data)")


def check_closed_form(config: Mapping, rows) -> None:
    """``closed_form`` checked before any model loads: its options, and the calibration rows it needs."""
    require_calibration(closed_form_options(config.get("closed_form")), rows)


def off_diagonal_scaled(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """``alpha G + (1 - alpha) diag(G)``: RegMean's shrinkage of the off-diagonal entries towards 0."""
    return alpha * gram + (1 - alpha) * torch.diag_embed(gram.diagonal())


def regmean_pieces(stack: torch.Tensor, products: torch.Tensor, total: torch.Tensor, input_first: bool
                   ) -> torch.Tensor:
    """Pieces ``(sum_j G~_j)^-1 G~_k tau_k`` of one layer, in ``stack``'s layout and dtype.

    ``products`` are ``G~_k tau_k`` in the inputs-first layout ``(K, in, out)``, ``total`` is ``sum_j G~_j``.
    One factorization serves every expert (their right-hand sides side by side).
    """
    k, n_in, n_out = products.shape
    rhs = products.double().permute(1, 0, 2).reshape(n_in, k * n_out)
    solved, info = torch.linalg.solve_ex(total.double(), rhs)
    if info.item() != 0:  # an input feature that is 0 on every expert's data: the least-norm solution
        solved = torch.linalg.pinv(total.double(), hermitian=True) @ rhs
    pieces = solved.reshape(n_in, k, n_out).permute(1, 0, 2)
    return (pieces if input_first else pieces.transpose(1, 2)).to(stack.dtype)


def inputs_first(tau: torch.Tensor, input_first: bool) -> torch.Tensor:
    return tau.float() if input_first else tau.float().T


@dataclass
class GramSystems:
    """RegMean's linear systems per solved layer: ``totals[n] = sum_k G~_k`` and ``products[n][k] = G~_k tau_k``
    (inputs-first layout), for the Linear / Conv1D weights every expert's data reached."""

    layers: dict[str, nn.Module]
    totals: dict[str, torch.Tensor]
    products: dict[str, torch.Tensor]


def gram_systems(teacher: MergedModel, stacks: Mapping[str, torch.Tensor], alpha: float, batches_of) -> GramSystems:
    """One expert at a time: its Gram matrices, off-diagonal scaled, added to the running sum and
    multiplied into its task vector, then dropped."""
    layers = linear_layers(teacher.base, stacks)
    totals: dict[str, torch.Tensor] = {}
    products: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    for k, task in enumerate(teacher.experts):
        with teacher.as_expert(k):
            grams = expert_grams(teacher, batches_of(task), layers)
        for name, gram in grams.items():
            scaled = off_diagonal_scaled(gram, alpha)
            totals[name] = totals[name] + scaled if name in totals else scaled
            tau = inputs_first(stacks[name][k].to(scaled.device), is_input_first(layers[name]))
            products[name].append((scaled @ tau).to(stacks[name].device))  # beside the stacks
        del grams
    solved = [n for n in layers if len(products[n]) == len(teacher.experts)]
    return GramSystems({n: layers[n] for n in solved}, {n: totals[n] for n in solved},
                       {n: torch.stack(products[n]) for n in solved})


def regmean(teacher: MergedModel, stacks: Mapping[str, torch.Tensor], spec: ClosedForm, batches_of
            ) -> dict[str, torch.Tensor]:
    """RegMean pieces of every stack: solved for the Linear / Conv1D weights every expert's data
    reached, ``tau_k / K`` (the simple average) for the other tensors."""
    systems = gram_systems(teacher, stacks, spec.alpha, batches_of)
    solved = {n: regmean_pieces(stacks[n], systems.products[n].to(stacks[n].device),
                                systems.totals[n].to(stacks[n].device), is_input_first(layer))
              for n, layer in systems.layers.items()}
    log.info("RegMean: %d linear weights solved from each expert's Gram matrices (alpha %s), %d tensors averaged",
             len(solved), spec.alpha, len(stacks) - len(solved))
    return {n: solved[n] if n in solved else s / len(teacher.experts) for n, s in stacks.items()}


def conjugate_gradient(matrix: torch.Tensor, rhs: torch.Tensor, start: torch.Tensor, iterations: int,
                       rtol: float = 1e-5) -> torch.Tensor:
    """``matrix @ X = rhs`` by conjugate gradient from ``start``, at most ``iterations`` steps, on the
    flattened system with Frobenius inner products (what MaTS's scipy ``cg`` over the flattened weight
    does; it stops once ``||residual|| <= rtol ||rhs||``, scipy's default)."""
    x = start.clone()
    residual = rhs - matrix @ x
    direction, norm_sq = residual.clone(), residual.square().sum()
    stop = (rtol * torch.linalg.vector_norm(rhs)) ** 2
    for _ in range(iterations):
        if norm_sq <= stop:
            break
        product = matrix @ direction
        step = norm_sq / (direction * product).sum()
        x += step * direction
        residual -= step * product
        new_norm_sq = residual.square().sum()
        direction = residual + (new_norm_sq / norm_sq) * direction
        norm_sq = new_norm_sq
    return x


def mats(teacher: MergedModel, stacks: Mapping[str, torch.Tensor], spec: ClosedForm, batches_of
         ) -> dict[str, torch.Tensor]:
    """MaTS pieces with the RegMean objective: per solved layer, ``iterations`` conjugate-gradient steps on
    ``(sum_k G~_k) D = sum_k G~_k tau_k`` from task arithmetic ``D0 = init_scale sum_k tau_k`` (CG on the
    weights ``W = W0 + D`` takes the same steps); the result is split evenly, ``D / K`` per expert. Other
    tensors: the simple average."""
    systems = gram_systems(teacher, stacks, spec.alpha, batches_of)
    k_experts, pieces = len(teacher.experts), {}
    for name, layer in systems.layers.items():
        stack, first = stacks[name], is_input_first(layer)
        start = inputs_first(stack.sum(0), first).double() * spec.init_scale
        delta = conjugate_gradient(systems.totals[name].double(), systems.products[name].double().sum(0).to(
            start.device), start.to(systems.totals[name].device), spec.iterations)
        delta = delta.to(stack.device) if first else delta.T.to(stack.device)
        pieces[name] = (delta / k_experts).to(stack.dtype).expand_as(stack).clone()
    log.info("MaTS: %d linear weights from %d conjugate-gradient steps (alpha %s, start: task arithmetic %s), "
             "%d tensors averaged", len(pieces), spec.iterations, spec.alpha, spec.init_scale,
             len(stacks) - len(pieces))
    return {n: pieces[n] if n in pieces else s / k_experts for n, s in stacks.items()}


def fisher_weights(fishers: list[dict[str, torch.Tensor]], spec: ClosedForm) -> torch.Tensor:
    """Per-expert weights ``w_k``: 1/K, or with ``normalize`` proportional to ``1 / (||F_k|| + floor)``."""
    k = len(fishers)
    if not spec.normalize:
        return torch.full((k,), 1.0 / k, dtype=torch.float64)
    norms = torch.stack([torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(f, dtype=torch.float64)
                                                               for f in fisher.values()]))
                         for fisher in fishers])
    inverse = 1.0 / (norms + spec.floor)
    return inverse / inverse.sum()


def fisher_pieces(stack: torch.Tensor, fisher: torch.Tensor, weights: torch.Tensor, floor: float) -> torch.Tensor:
    """Pieces ``w_k F~_k tau_k / sum_j w_j F~_j`` of one tensor (``fisher`` is ``(K, *shape)``)."""
    weighted = (fisher.double() + floor) * weights.to(fisher.device).view(-1, *[1] * (fisher.dim() - 1))
    return (weighted * stack.double() / weighted.sum(0)).to(stack.dtype)


def fisher(teacher: MergedModel, stacks: Mapping[str, torch.Tensor], spec: ClosedForm, batches_of
           ) -> dict[str, torch.Tensor]:
    """Fisher-merging pieces of every stack."""
    fishers = []
    for k, task in enumerate(teacher.experts):
        with teacher.as_expert(k):  # kept beside the stacks (host memory where they were built there)
            fishers.append({n: f.to(stacks[n].device) for n, f in expert_fisher(teacher, batches_of(task)).items()})
    weights = fisher_weights(fishers, spec)
    log.info("Fisher merging: diagonal Fishers of %d tensors, expert weights %s", len(stacks),
             [round(w, 4) for w in weights.tolist()])
    pieces = {}
    for name, stack in stacks.items():
        per_expert = torch.stack([f.pop(name) for f in fishers]).to(stack.device)
        pieces[name] = fisher_pieces(stack, per_expert, weights, spec.floor)
    return pieces


SOLVERS = {"regmean": regmean, "mats": mats, "fisher": fisher}


def closed_form_task_vectors(tv: TaskVectors, base: nn.Module, data, spec: ClosedForm, tokenizer=None
                             ) -> TaskVectors:
    """``tv`` with each expert's task vectors replaced by its piece of the closed-form merge.

    The experts are ``W0 + tau_k`` of ``tv`` (after ``pool.preprocess``), run in teacher mode on their own
    task's first ``spec.examples`` calibration rows (``data``: a ``TaskDataModule`` whose tasks are the experts).
    """
    require_calibration(spec, data)
    dense = tv.densified(f"closed_form.method={spec.method} solves on dense values")
    teacher = MergedModel(base, dense, Task(init=0.0))  # teacher mode only: shares the base and the stacks
    scorer = Objective(positions=spec.positions, new_tokens=spec.new_tokens)
    scorer.setup(teacher, data, tokenizer)

    def batches_of(task: str):
        return expert_batches(teacher, data.loader(task), scorer, spec.examples)

    stacks = {n: teacher.stack(n) for n in dense.names}
    pieces = SOLVERS[spec.method](teacher, stacks, spec, batches_of)
    out = replace(dense, stacks={n: pieces[n] for n in dense.names}, offloaded=False)
    return out.offload() if tv.offloaded else out


def closed_form_merge(tv: TaskVectors, base: nn.Module, config: Mapping, data, tokenizer=None) -> TaskVectors:
    """A run config's ``closed_form`` applied to ``tv`` (``tv`` itself when ``closed_form.method=none``)."""
    spec = closed_form_options(config.get("closed_form"))
    return closed_form_task_vectors(tv, base, data, spec, tokenizer) if spec.enabled else tv
