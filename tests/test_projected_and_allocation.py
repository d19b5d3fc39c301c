"""DOGE (objective=projected) with every granularity, and Expert Merging++'s chunk allocation."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny import build_module, quiet_trainer, tiny_parts, write_zoo

from adamerge.allocation import allocate_chunks, tensor_importance
from adamerge.datamodule import DataFree
from adamerge.errors import AdamergeError
from adamerge.tensors import TensorInfo

GRANULARITIES = [{"name": "task"}, {"name": "layer"}, {"name": "block", "partitions": 2},
                 {"name": "chunk", "chunks": {"*": 2}}, {"name": "column"}]


@pytest.fixture(scope="module")
def parts():
    return tiny_parts()


@pytest.mark.parametrize("granularity", GRANULARITIES, ids=lambda g: g["name"])
def test_projected_trains_and_folds_with_every_granularity(parts, granularity):
    merged, _, module = build_module(parts, granularity, {"name": "projected", "mask_density": 0.3}, {"lr": 1e-3})
    objective = module.objective
    before = float(objective.task_loss(merged, "all", None))
    quiet_trainer(5).fit(module, datamodule=DataFree(5))
    assert float(objective.task_loss(merged, "all", None)) < before
    assert all(not p.requires_grad for p in merged.granularity.parameters())  # lambda = rho / ||tau|| stays
    objective.task_loss(merged, "all", None).backward()
    objective.after_backward(merged)
    for name in objective.names:
        delta, basis = objective.deltas[name.replace(".", "/")], objective.bases[name]
        assert delta.abs().max() > 0 and delta.grad.abs().max() > 0
        assert (basis.T @ delta.grad).abs().max() <= 1e-5 * delta.grad.abs().max()  # projected off the subspace
    expected = {n: objective.adjusted(merged, n).detach() for n in objective.names}
    objective.finish(merged)
    for name, stack in expected.items():
        torch.testing.assert_close(merged.stack(name), stack)
    inputs = {"input_ids": torch.tensor([[1, 5, 6, 7]])}
    torch.testing.assert_close(merged.fold()(**inputs).logits, merged(**inputs).logits, atol=1e-5, rtol=0)


def test_allocation_spends_the_budget_by_importance():
    importance = {"a": 0.6, "b": 0.3, "c": 0.1}
    counts = allocate_chunks(importance, 13, {"a": 100, "b": 100, "c": 100})
    assert sum(counts.values()) == 13 and all(v >= 1 for v in counts.values())
    assert counts["a"] > counts["b"] > counts["c"]
    capped = allocate_chunks(importance, 13, {"a": 2, "b": 100, "c": 100})
    assert capped["a"] == 2 and sum(capped.values()) == 13
    with pytest.raises(AdamergeError, match="budget"):
        allocate_chunks(importance, 2, {"a": 9, "b": 9, "c": 9})


def test_importance_grows_with_coefficients_and_task_vector_size():
    stacks = {"small": torch.full((2, 4, 4), 0.01), "large": torch.full((2, 4, 4), 0.1)}
    sq_norms = {n: s.flatten(1).pow(2).sum(1) for n, s in stacks.items()}
    infos = {n: TensorInfo(n, (4, 4), "matrix", 1) for n in stacks}
    coefficients = {"small": torch.ones(2, 1), "large": torch.ones(2, 1)}
    importance = tensor_importance(coefficients, sq_norms, infos)
    assert importance["large"] > importance["small"] and abs(sum(importance.values()) - 1) < 1e-6
    coefficients["large"] = torch.zeros(2, 1)
    assert tensor_importance(coefficients, sq_norms, infos)["large"] == 0


def test_expert_merging_plus_plus_runs_two_stages_from_the_cli(tmp_path):
    from test_cli import QUIET, finish, start

    zoo = write_zoo(tmp_path / "zoo")
    args = [*zoo.cli_args(), *QUIET, "granularity=chunk", "granularity.budget=40", "objective=align",
            "trainer.max_steps=4", f"output_dir={tmp_path / 'out'}", f"hydra.run.dir={tmp_path / 'run'}"]
    result = finish(start(args, tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    allocation = json.loads((tmp_path / "run" / "chunk_allocation.json").read_text())
    assert sum(allocation["counts"].values()) == 40
    saved = load_file(str(tmp_path / "out" / "adamerge_coefficients.safetensors"))
    assert {name: t.shape[1] for name, t in saved.items()} == allocation["counts"]
