"""Gradient-free search (``search=cma``, adamerge/search.py): CMA-ES over a granularity's coefficients finds a
known optimum, never ends worse than its start, is reproducible for a seed, reads MERGE³'s reduced subsets
deterministically and refuses search spaces it cannot learn with one line."""

from __future__ import annotations

import pytest
import torch
from tiny import build_module, tiny_parts

from adamerge.errors import AdamergeError
from adamerge.granularity import Layer, Task
from adamerge.merged import MergedModel
from adamerge.objectives import Entropy
from adamerge.search import (
    SearchOptions,
    cma_search,
    coefficient_count,
    harness_fitness,
    objective_fitness,
    reduced_indices,
    reduced_rows,
    search_options,
)


@pytest.fixture(scope="module")
def parts():
    return tiny_parts()


def task_merge(parts, init: float = 0.3) -> MergedModel:
    return MergedModel(parts.pool.base, parts.task_vectors, Task(init=init))


def distance_to(merged: MergedModel, target: torch.Tensor):
    """A fitness whose optimum is known: the squared distance of the task coefficients to ``target``."""
    return lambda: float(((merged.granularity.table()["task"][:, 0] - target) ** 2).sum())


def test_cma_finds_known_coefficients(parts):
    merged, target = task_merge(parts), torch.tensor([0.1, 0.8])
    result = cma_search(merged, distance_to(merged, target), SearchOptions(max_evals=300), seed=0)
    found = merged.granularity.table()["task"][:, 0]
    assert result.initial == pytest.approx(0.29)  # (0.3 - 0.1)^2 + (0.3 - 0.8)^2
    assert result.best < 1e-4 < result.initial
    assert torch.allclose(found, target, atol=0.01)
    assert result.best == pytest.approx(distance_to(merged, target)())  # the best candidate is left in the model
    assert [g.generation for g in result.history] == list(range(len(result.history)))
    so_far = [g.best_so_far for g in result.history]
    assert so_far[0] == result.initial and so_far == sorted(so_far, reverse=True) and so_far[-1] == result.best
    # the start, then the budget, checked after each generation of 6 candidates (4 + 3 ln 2)
    assert 300 <= result.evaluations - 1 <= 300 + 6


def test_the_search_is_reproducible_for_a_seed(parts):
    target = torch.tensor([0.6, 0.2])

    def searched(seed: int) -> torch.Tensor:
        merged = task_merge(parts)
        cma_search(merged, distance_to(merged, target), SearchOptions(max_evals=12), seed=seed)
        return merged.granularity.table()["task"]

    assert torch.equal(searched(3), searched(3))
    assert not torch.equal(searched(3), searched(4))


def test_objective_fitness_search_ends_no_worse_than_its_start(parts):
    merged, data, _ = build_module(parts, {"name": "task", "init": 0.3}, {"name": "entropy"}, batch_size=4)
    fitness = objective_fitness(merged, Entropy(), data, parts.tokenizer, size=None, seed=0)
    start = fitness()
    assert start == fitness()  # one number per candidate: eval mode, fixed batches
    result = cma_search(merged, fitness, SearchOptions(max_evals=12, popsize=4), seed=0)
    assert result.initial == start and result.best <= start
    assert fitness() == pytest.approx(result.best)


class FakeHarness:
    """lm-eval's scores as a function of the first task coefficient (the harness itself is tested in test_harness)."""

    def __init__(self, merged: MergedModel) -> None:
        self.merged, self.folds = merged, 0

    def evaluate(self, model, tokenizer):
        self.folds += 1
        c = float(self.merged.granularity.table()["task"][0, 0])
        return {"arc": {"acc": 1 - abs(c - 0.7), "acc_stderr": 0.1}, "hellaswag": {"acc": 0.5, "acc_norm": 0.4}}


def test_harness_fitness_is_one_minus_the_mean_metric(parts):
    merged = task_merge(parts)
    harness = FakeHarness(merged)
    fitness = harness_fitness(merged, harness, parts.tokenizer, "acc")
    assert fitness() == pytest.approx(1 - (0.6 + 0.5) / 2)
    result = cma_search(merged, fitness, SearchOptions(max_evals=40), seed=0)
    assert result.best < result.initial and harness.folds == result.evaluations + 1  # + the check above
    with pytest.raises(AdamergeError, match="search.metric='acc_norm' is not reported by lm-eval for .*arc"):
        harness_fitness(merged, harness, parts.tokenizer, "acc_norm")()


def test_reduced_subset_is_a_seeded_sample():
    picked = reduced_indices(100, 20, seed=7)
    assert picked == reduced_indices(100, 20, seed=7)
    assert len(set(picked)) == 20 and picked == sorted(picked) and all(0 <= i < 100 for i in picked)
    assert picked != reduced_indices(100, 20, seed=8)
    assert reduced_indices(10, 20, seed=7) == list(range(10)) == reduced_indices(10, None, seed=7)
    rows = {"a": [{"i": i} for i in range(100)], "b": [{"i": i} for i in range(5)]}
    reduced = reduced_rows(rows, 20, seed=7)
    assert [r["i"] for r in reduced["a"]] == picked and reduced["b"] == rows["b"]


def test_too_many_coefficients_are_refused_with_one_line(parts):
    merged = MergedModel(parts.pool.base, parts.task_vectors, Layer(init=0.3))
    n = coefficient_count(merged)
    assert n == 2 * len(parts.task_vectors.names)  # one per expert and tensor

    def never():
        raise AssertionError("no candidate may be scored")

    with pytest.raises(AdamergeError, match=rf"over {n} coefficients .*max_coefficients={n - 1}") as error:
        cma_search(merged, never, SearchOptions(max_coefficients=n - 1))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("section, message", [
    ({"sigma0": 0}, "search.sigma0=0 must be a finite number > 0"),
    ({"subset": 0}, "search.subset=0 must be an integer >= 1 or null"),
    ({"fitness": "loss"}, "search.fitness='loss'; choose from"),
    ({"bounds": [0.0]}, "search.bounds"),
    ({"popsize": 1}, "search.popsize=1"),
    ({"sigam0": 0.1}, "search: .*sigam0"),
    ({"fitness": "harness"}, "search.fitness=harness .* eval.harness.tasks"),
    ({"name": "ga"}, "search='ga' is unknown"),
])
def test_bad_search_options_are_one_line_errors(section, message):
    with pytest.raises(AdamergeError, match=message):
        search_options({"search": {"name": "cma", **section}})


def test_resume_is_refused_with_a_search():
    with pytest.raises(AdamergeError, match="resume= continues a gradient run"):
        search_options({"search": {"name": "cma"}, "resume": "last.ckpt"})


def test_search_none_is_a_gradient_run():
    assert search_options({"search": {"name": "none"}}) is None
    assert search_options({}) is None


def test_the_preset_runs_end_to_end_with_the_models_loaded_once(tmp_path, monkeypatch):
    """``method=evolutionary_task`` through ``run``: base and experts loaded once for every candidate, the best
    fitness per generation in the CSV log (never above the start), the folded checkpoint written with its card."""
    import csv

    from hydra import compose, initialize_config_module
    from tiny import write_zoo

    from adamerge.overrides import open_mapping_overrides
    from adamerge.pool import ExpertPool
    from adamerge.run import run

    zoo = write_zoo(tmp_path / "zoo")  # its data rows carry answers: the dev set defaults to data.paths
    loads = []  # the base is built once, the experts are read in one pass over them (one at a time)
    load_model, iter_experts = ExpertPool._load_model, ExpertPool.iter_experts
    monkeypatch.setattr(ExpertPool, "_load_model", lambda self, source, role: loads.append(role) or
                        load_model(self, source, role))
    monkeypatch.setattr(ExpertPool, "iter_experts", lambda self: loads.append("experts") or iter_experts(self))
    overrides = [*zoo.cli_args(), "method=evolutionary_task", "search.max_evals=10", "search.popsize=4",
                 "search.subset=5", "logger=csv", f"output_dir={tmp_path / 'out'}", "eval.max_new_tokens=4"]
    with initialize_config_module("adamerge.conf", version_base=None):
        cfg = compose("config", overrides=open_mapping_overrides(overrides))
    result = run(cfg, tmp_path / "run")

    assert {"base", "experts"} <= set(loads) and len(loads) == len(set(loads))  # each once (an expert: at most)
    with open(next((tmp_path / "run" / "logs").glob("version_*/metrics.csv"))) as f:
        rows = [r for r in csv.DictReader(f) if r.get("search/best_so_far")]
    so_far = [float(r["search/best_so_far"]) for r in rows]
    assert len(so_far) >= 3 and so_far == sorted(so_far, reverse=True)  # generation 0 (the start), then >= 2
    assert int(float(rows[-1]["search/evaluations"])) == 1 + 12  # the start + 3 generations of 4 (budget 10)
    assert (tmp_path / "out" / "model.safetensors").exists()
    card = (tmp_path / "out" / "README.md").read_text()
    assert "Evolutionary merging (CMA-ES)" in card
    assert "- search: `cma, fitness eval (subset 5), 10 evaluations`" in card
    assert result.metrics["after"] == {}  # no eval.tests: the fitness read the dev rows only
