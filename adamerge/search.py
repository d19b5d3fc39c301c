"""Gradient-free search of the merge coefficients: evolutionary merging with CMA-ES (``search=cma``).

Evolutionary model merging (Akiba et al., arXiv 2403.13187) searches the coefficients of a merge with
a black-box optimizer, CMA-ES, whose fitness is a score of the merged model on a small labeled dev
set; mergekit-evolve and Mergenetic (arXiv 2505.11427) offer it as tools. Here the search space is the
one a learned run trains, a granularity's raw coefficients (``task``, ``layer``, ...), so gradient and
evolutionary search compare on identical ground. The base and the task vectors are loaded once per
process: each candidate is written into the same ``MergedModel`` and scored through ``merge_once``
(one merge per candidate, no fold, no reload).

Defaults follow mergekit-evolve (arcee-ai/mergekit, ``mergekit/scripts/evolve.py``): pycma's
``CMAEvolutionStrategy`` with ``sigma0 = 1/6``, a budget of 100 fitness evaluations
(``--max-fevals``) and pycma's own population size ``4 + floor(3 ln n)`` for n coefficients; the
search starts at the granularity's ``init``. The fitness (minimized) is one of

- ``eval``: ``1 -`` the mean over tasks of the eval metric (exact match of greedy answers, or a
  classifier's accuracy) on ``search.dev`` (labeled rows per task, like ``eval.tests``; never the
  test set itself);
- ``objective``: the run's objective loss (entropy, align, ...) on the calibration data, summed over
  tasks with their ``task_weights`` plus its regularizer, as one training step scores it;
- ``harness``: ``1 -`` the mean over lm-eval tasks of ``search.metric`` (``eval.harness``).

MERGE³'s reduced dataset (Mencattini et al., arXiv 2502.10436): with ``search.subset=N`` each task's
fitness rows are N items drawn uniformly without replacement by a seeded sample, fixed for the whole
search, as Mergenetic's ``df.sample(n=n_samples, random_state=seed)`` per language
(tommasomncttn/mergenetic, ``experiments/evolutionary-merging/end2end_multilingual.py``). MERGE³'s IRT
performance estimator on top of that subset is not implemented: the fitness is the subset's plain mean.

CMA-ES adapts an n x n covariance, which needs on the order of n^2 evaluations to learn; searches of
more than ``search.max_coefficients`` (1000) coefficients are refused with one line.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.nn.utils import parameters_to_vector
from torch.utils.data import DataLoader, Subset

from adamerge.errors import AdamergeError
from adamerge.loading import load_test_sets
from adamerge.merged import MergedModel
from adamerge.objectives.base import Objective

log = logging.getLogger(__name__)

FITNESSES = ("eval", "objective", "harness")
INSTALL = "pip install 'adamerge[search]'"
Fitness = Callable[[], float]
"""Scores the merged model's current coefficients; lower is better."""


@dataclass
class SearchOptions:
    """``search`` (conf/search/cma.yaml); see the module docstring for what each option follows."""

    name: str = "cma"
    fitness: str = "eval"
    dev: dict[str, Any] = field(default_factory=dict)  # task -> labeled rows (empty: data.paths)
    subset: int | None = None
    metric: str = "acc"
    max_evals: int = 100
    generations: int | None = None
    popsize: int | None = None
    sigma0: float = 1 / 6
    bounds: list[float | None] | None = None
    seed: int | None = None
    max_coefficients: int = 1000

    def __post_init__(self) -> None:
        if self.fitness not in FITNESSES:
            raise AdamergeError(f"search.fitness={self.fitness!r}; choose from {list(FITNESSES)}")
        for key, minimum, allow_none in (("subset", 1, True), ("max_evals", 1, False), ("generations", 1, True),
                                         ("popsize", 2, True), ("max_coefficients", 1, False), ("seed", None, True)):
            value = getattr(self, key)
            if value is None and allow_none:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
                bound = "an integer" if minimum is None else f"an integer >= {minimum}"
                raise AdamergeError(f"search.{key}={value!r} must be {bound}{' or null' if allow_none else ''}")
        if isinstance(self.sigma0, bool) or not isinstance(self.sigma0, int | float) or not 0 < self.sigma0 < math.inf:
            raise AdamergeError(f"search.sigma0={self.sigma0!r} must be a finite number > 0")
        if self.bounds is not None and (len(self.bounds) != 2 or not all(
                b is None or (isinstance(b, int | float) and not isinstance(b, bool)) for b in self.bounds)):
            raise AdamergeError(f"search.bounds={self.bounds!r} must be [lower, upper] (numbers or null) or null")


def search_options(config: Mapping[str, Any]) -> SearchOptions | None:
    """The run's ``search`` section checked against the rest of the config, or None for a gradient-trained (or
    static) run (``search=none``)."""
    cfg = dict(config.get("search") or {})
    if cfg.get("name", "none") == "none":
        return None
    if cfg["name"] != "cma":
        raise AdamergeError(f"search={cfg['name']!r} is unknown; choose from ['cma', 'none']")
    try:
        options = SearchOptions(**cfg)
    except TypeError as e:
        raise AdamergeError(f"search: {e}") from e
    try:
        import cma  # noqa: F401
    except ImportError as e:
        raise AdamergeError(f"search=cma needs pycma: {INSTALL}") from e
    if config.get("resume"):
        raise AdamergeError("resume= continues a gradient run from its checkpoint; search=cma starts from "
                            "granularity.init (set it to the coefficients to start from)")
    if options.fitness == "harness" and not ((config.get("eval") or {}).get("harness") or {}).get("tasks"):
        raise AdamergeError("search.fitness=harness scores candidates with lm-eval: set eval.harness.tasks")
    return options


def load_dev_rows(options: SearchOptions, config: Mapping[str, Any], causal: bool) -> dict[str, Sequence[Mapping]]:
    """``search.dev`` (or, when empty, the calibration files ``data.paths``, which must then carry answers or
    labels), read like ``eval.tests`` and cut to the reduced subsets; before any model is loaded."""
    sources = options.dev or (config.get("data") or {}).get("paths") or {}
    if not sources:
        raise AdamergeError("search.fitness=eval scores candidates on labeled dev rows: set search.dev.TASK=FILE "
                            "(like eval.tests, but not the test set)")
    where = "search.dev" if options.dev else "search.dev (empty: data.paths)"
    eval_cfg = {**(config.get("eval") or {}), "tests": sources, "limit": None}
    try:
        rows = load_test_sets(eval_cfg, causal)
    except AdamergeError as e:
        raise AdamergeError(f"{where}: {e}") from e
    return reduced_rows(rows, options.subset, search_seed(options, config))


def search_seed(options: SearchOptions, config: Mapping[str, Any]) -> int:
    return int(options.seed if options.seed is not None else config.get("seed", 0))


def reduced_indices(n: int, size: int | None, seed: int) -> list[int]:
    """MERGE³'s reduced dataset: ``size`` of ``n`` item indices drawn uniformly without replacement by
    ``seed`` (all of them when ``size`` is None or not smaller than ``n``), in their original order."""
    if size is None or size >= n:
        return list(range(n))
    return sorted(np.random.default_rng(seed).choice(n, size=size, replace=False).tolist())


def reduced_rows(rows: Mapping[str, Sequence[Mapping]], size: int | None, seed: int) -> dict[str, list[Mapping]]:
    """Each task's rows cut to its reduced subset (the same seed for every task, as Mergenetic)."""
    return {task: [task_rows[i] for i in reduced_indices(len(task_rows), size, seed)]
            for task, task_rows in rows.items()}


# ---- the search space: a granularity's raw coefficients as one vector -------------------------------


def coefficient_count(merged: MergedModel) -> int:
    return sum(p.numel() for p in merged.granularity.raw.values())


def check_search_size(merged: MergedModel, options: SearchOptions) -> None:
    """Refuse a search space CMA-ES cannot learn in a practical budget, before any fitness is computed."""
    n = coefficient_count(merged)
    if n > options.max_coefficients:
        granularity = type(merged.granularity).__name__.lower()
        raise AdamergeError(
            f"search=cma over {n} coefficients (granularity={granularity}) exceeds search.max_coefficients="
            f"{options.max_coefficients}: CMA-ES learns an n x n covariance from about n^2 evaluations; use "
            "granularity=task or layer, or learn these coefficients with gradients (search=none)")


def current_vector(merged: MergedModel) -> np.ndarray:
    return parameters_to_vector(merged.granularity.raw.values()).detach().cpu().double().numpy()


@torch.no_grad()
def load_vector(merged: MergedModel, x: Sequence[float]) -> None:
    """Write a candidate into the granularity's raw parameters (in place: the model is not rebuilt)."""
    values, offset = torch.as_tensor(np.asarray(x)), 0
    for p in merged.granularity.raw.values():
        p.copy_(values[offset:offset + p.numel()].view_as(p))
        offset += p.numel()


# ---- fitness functions --------------------------------------------------------------------------------


def eval_fitness(merged: MergedModel, tokenizer, rows: Mapping[str, Sequence[Mapping]], eval_cfg: Mapping,
                 causal: bool) -> Fitness:
    """``1 -`` the mean over tasks of exact match (causal LMs) or accuracy (classifiers, each task with its head)
    on ``rows``, the merge computed once per candidate."""
    from adamerge.evaluate import accuracy, exact_match

    field_, label_field = eval_cfg.get("field", "text"), eval_cfg.get("label_field", "label")
    batch_size, new_tokens = eval_cfg.get("batch_size", 64), eval_cfg.get("max_new_tokens", 16)

    def score(task_rows: Sequence[Mapping]) -> float:
        if causal:
            return exact_match(merged, tokenizer, task_rows, new_tokens, batch_size)
        return accuracy(merged, tokenizer, task_rows, batch_size, field_, label_field)

    def fitness() -> float:
        scores = []
        with torch.no_grad(), merged.merge_once():
            for task, task_rows in rows.items():
                with merged.task(task) if task in merged.experts else nullcontext():
                    scores.append(score(task_rows))
        return 1.0 - sum(scores) / len(scores)

    return fitness


def calibration_batches(data, size: int | None, seed: int) -> dict[str, list[dict[str, torch.Tensor]]]:
    """Each task's calibration batches in a fixed order (its reduced subset with ``size``), keeping the rows'
    own indices, which cached teachers are looked up by."""
    if data is None:  # a data-free objective: the one placeholder batch a training step gets
        return {"all": [{"step": torch.zeros(1, dtype=torch.long)}]}
    batches = {}
    for task, dataset in data.datasets.items():
        subset = Subset(dataset, reduced_indices(len(dataset), size, seed))
        batches[task] = list(DataLoader(subset, batch_size=data.batch_size, shuffle=False, collate_fn=data.collator))
    return batches


def objective_fitness(merged: MergedModel, objective: Objective, data, tokenizer, size: int | None,
                      seed: int) -> Fitness:
    """The objective's loss as a training step computes it (task losses weighted by ``task_weights``, plus the
    regularizer), each task's loss averaged over all its calibration batches; in eval mode (no dropout), so that
    a candidate's fitness is one number."""
    if objective.extra_parameters():
        raise AdamergeError(f"objective {type(objective).__name__} trains tensors of its own besides the "
                            "coefficients; search=cma searches the coefficients only: use search=none")
    objective.setup(merged, data, tokenizer)
    batches = calibration_batches(data, size, seed)
    device = next(merged.parameters()).device

    def fitness() -> float:
        total = 0.0
        merged.eval()
        with torch.no_grad(), merged.merge_once():
            for task, task_batches in batches.items():
                with merged.task(task) if task in merged.experts else nullcontext():
                    losses = [float(objective.task_loss(merged, task, {k: v.to(device) for k, v in b.items()}))
                              for b in task_batches]
                total += objective.task_weights.get(task, 1.0) * sum(losses) / len(losses)
            reg = objective.regularizer(merged)
        return total + (float(reg) if reg is not None else 0.0)

    return fitness


def harness_fitness(merged: MergedModel, harness, tokenizer, metric: str) -> Fitness:
    """``1 -`` the mean over lm-eval tasks of ``metric`` on the folded candidate (``eval.harness``; its
    ``limit`` is the reduced dataset there)."""

    def fitness() -> float:
        scores = harness.evaluate(merged.fold(), tokenizer)
        missing = {task: sorted(m) for task, m in scores.items() if metric not in m}
        if missing:
            raise AdamergeError(f"search.metric={metric!r} is not reported by lm-eval for {missing}")
        return 1.0 - sum(m[metric] for m in scores.values()) / len(scores)

    return fitness


# ---- the search ---------------------------------------------------------------------------------------


@dataclass
class Generation:
    """One CMA-ES generation: its best fitness, the best so far, the evaluations so far and the step size."""

    generation: int
    evaluations: int
    best: float
    best_so_far: float
    sigma: float


@dataclass
class SearchResult:
    initial: float  # fitness of the starting coefficients (the granularity's init)
    best: float
    evaluations: int
    history: list[Generation]


def cma_options(options: SearchOptions, seed: int) -> dict[str, Any]:
    """pycma's options: quiet, no files, its own seeded normal sampler (pycma's ``seed`` 0 would mean "time"), and
    no stop on generations of equal scores (pycma's ``tolfun``, ``tolfunhist``, ``tolflatfitness``): an accuracy on
    a few items per task is a step function, flat in places where the search has not converged, and pycma widens
    its step size there; the budget ends the search."""
    rng = np.random.default_rng(seed)
    inopts: dict[str, Any] = {"maxfevals": options.max_evals, "verbose": -9, "verb_log": 0, "verb_disp": 0,
                              "seed": np.nan, "randn": lambda *shape: rng.standard_normal(shape),
                              "tolfun": 0, "tolfunhist": 0, "tolflatfitness": options.max_evals}
    if options.generations is not None:
        inopts["maxiter"] = options.generations
    if options.popsize is not None:
        inopts["popsize"] = options.popsize
    if options.bounds is not None:
        inopts["bounds"] = list(options.bounds)
    return inopts


def cma_search(merged: MergedModel, fitness: Fitness, options: SearchOptions, seed: int = 0,
               on_generation: Callable[[Generation], None] | None = None) -> SearchResult:
    """CMA-ES over the granularity's raw coefficients from their current values; leaves the best candidate
    seen (the start included) in the model. Stops at ``max_evals`` evaluations (after the generation that
    reaches it), ``generations``, or pycma's own convergence tests."""
    import cma

    check_search_size(merged, options)
    x0 = current_vector(merged)
    best_x, best = x0, fitness()
    initial = best
    es = cma.CMAEvolutionStrategy(x0, options.sigma0, cma_options(options, seed))
    history = [Generation(0, 1, initial, initial, options.sigma0)]  # generation 0: the start point
    if on_generation is not None:
        on_generation(history[0])
    while not es.stop():
        candidates = es.ask()
        scores = []
        for x in candidates:
            load_vector(merged, x)
            scores.append(fitness())
        es.tell(candidates, scores)
        i = int(np.argmin(scores))
        if scores[i] < best:
            best_x, best = np.array(candidates[i]), scores[i]
        history.append(Generation(len(history), es.countevals + 1, scores[i], best, float(es.sigma)))
        if on_generation is not None:
            on_generation(history[-1])
    load_vector(merged, best_x)
    return SearchResult(initial, best, es.countevals + 1, history)


def log_generation(logger) -> Callable[[Generation], None]:
    """Each generation as a run-log line and, with a logger (``logger=csv|tensorboard|wandb``), as metrics."""

    def report(g: Generation) -> None:
        log.info("search generation %d (%d evaluations): best %.4f, best so far %.4f, sigma %.3g",
                 g.generation, g.evaluations, g.best, g.best_so_far, g.sigma)
        if logger is not None:
            logger.log_metrics({"search/best": g.best, "search/best_so_far": g.best_so_far, "search/sigma": g.sigma,
                                "search/evaluations": g.evaluations}, step=g.generation)

    return report


def run_search(merged: MergedModel, options: SearchOptions, config: Mapping[str, Any], *, objective: Objective,
               data, tokenizer, causal: bool, dev: Mapping[str, Sequence[Mapping]] | None, harness=None,
               harness_tokenizer=None, logger=None) -> SearchResult:
    """The run's search (in place of ``fit``): the fitness ``search.fitness`` names, CMA-ES from the
    granularity's init, the best coefficients left in ``merged`` for the evaluation, fold and write that follow."""
    check_search_size(merged, options)  # before a fitness is set up (teachers cached, data read)
    seed = search_seed(options, config)
    if options.fitness == "eval":
        fitness = eval_fitness(merged, tokenizer, dev or {}, config.get("eval") or {}, causal)
    elif options.fitness == "objective":
        fitness = objective_fitness(merged, objective, data, tokenizer, options.subset, seed)
    else:
        fitness = harness_fitness(merged, harness, harness_tokenizer or tokenizer, options.metric)
    log.info("search=cma over %d coefficients, fitness=%s, at most %d evaluations", coefficient_count(merged),
             options.fitness, options.max_evals)
    result = cma_search(merged, fitness, options, seed, log_generation(logger))
    log.info("search=cma: fitness %.4f at the start, %.4f after %d evaluations", result.initial, result.best,
             result.evaluations)
    return result
