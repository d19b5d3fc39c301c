"""Closed-form merges (``closed_form.method``): RegMean is the least-squares merge of a linear layer,
Fisher merging is its formula over Fishers a plain expert model gives, both run end to end as
presets, and a learned run composes with them (starting at the closed form with coefficients 1)."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_module
from safetensors.torch import load_file
from tiny import tiny_parts, write_zoo
from torch import nn
from transformers.pytorch_utils import Conv1D

from adamerge.building import build_datamodule, max_positions
from adamerge.closed_form import (
    ClosedForm,
    closed_form_options,
    closed_form_task_vectors,
    fisher_weights,
    mats,
    regmean,
)
from adamerge.data import Collator
from adamerge.datamodule import TaskDataModule
from adamerge.errors import AdamergeError
from adamerge.fold import refold
from adamerge.granularity import Task
from adamerge.loading import as_dict, build_pool, build_task_vectors, build_tokenizer, load_calibration
from adamerge.merged import MergedModel
from adamerge.objectives import OBJECTIVES
from adamerge.objectives.base import Objective
from adamerge.options import construct
from adamerge.overrides import open_mapping_overrides
from adamerge.plan import make_plan
from adamerge.run import run
from adamerge.statistics import expert_batches, expert_fisher, label_expectation
from adamerge.taskvectors import TaskVectors
from adamerge.tensors import describe_tensor


class OneLayer(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.proj = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def one_layer_pool(kind: str, n_in: int = 6, n_out: int = 4, rows: int = 20):
    """A Linear or Conv1D layer as base, three experts (random task vectors) and each one's inputs."""
    torch.manual_seed(0)
    experts = ("a", "b", "c")
    base = OneLayer(nn.Linear(n_in, n_out) if kind == "linear" else Conv1D(n_out, n_in)).double()
    params = dict(base.named_parameters())
    stacks = {n: 0.3 * torch.randn(len(experts), *p.shape, dtype=torch.float64) for n, p in params.items()}
    tv = TaskVectors(list(experts), {n: describe_tensor(base, n, p) for n, p in params.items()}, stacks)
    inputs = {e: torch.randn(1, rows, n_in, dtype=torch.float64) * torch.rand(n_in, dtype=torch.float64) * 3
              for e in experts}

    def batches_of(task: str):
        return [({"x": inputs[task]}, torch.ones(rows, 1, dtype=torch.bool))]

    return MergedModel(base, tv, Task(init=0.0)), stacks, inputs, batches_of


def out_in(w: torch.Tensor, kind: str) -> torch.Tensor:
    """A weight in nn.Linear's (out, in) layout (Conv1D stores (in, out))."""
    return w.T if kind == "conv1d" else w


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_regmean_is_the_least_squares_merge_of_a_linear_layer(kind):
    """With alpha = 1, W* = argmin_W sum_k ||X_k W^T - X_k W_k^T||^2 (equal row counts): torch.linalg.lstsq
    on the stacked inputs; the bias, not a linear weight, is the simple average."""
    teacher, stacks, inputs, batches_of = one_layer_pool(kind)
    pieces = regmean(teacher, stacks, ClosedForm(method="regmean", alpha=1.0), batches_of)
    w0 = teacher.base.proj.weight.detach()
    xs = torch.cat([x[0] for x in inputs.values()])
    targets = torch.cat([x[0] @ out_in(w0 + stacks["proj.weight"][k], kind).T for k, x in enumerate(inputs.values())])
    expected = torch.linalg.lstsq(xs, targets).solution.T
    merged = out_in(w0 + pieces["proj.weight"].sum(0), kind)
    assert torch.allclose(merged, expected, atol=1e-5), (merged - expected).abs().max()
    assert torch.allclose(pieces["proj.bias"].sum(0), stacks["proj.bias"].mean(0))
    plain_average = out_in(w0 + stacks["proj.weight"].mean(0), kind)
    assert (merged - plain_average).abs().max() > 1e-2  # the solve did something the average does not


def test_mats_starts_at_task_arithmetic_and_its_conjugate_gradient_reaches_regmean():
    teacher, stacks, _, batches_of = one_layer_pool("linear")
    tau = stacks["proj.weight"]
    start = mats(teacher, stacks, ClosedForm(method="mats", alpha=0.6, iterations=0), batches_of)
    assert torch.allclose(start["proj.weight"].sum(0), 0.3 * tau.sum(0))
    assert torch.allclose(start["proj.weight"][0], start["proj.weight"][1])  # the delta split evenly
    solved = mats(teacher, stacks, ClosedForm(method="mats", alpha=0.6, iterations=50), batches_of)
    exact = regmean(teacher, stacks, ClosedForm(method="regmean", alpha=0.6), batches_of)
    assert torch.allclose(solved["proj.weight"].sum(0), exact["proj.weight"].sum(0), atol=1e-4)
    two_steps = mats(teacher, stacks, ClosedForm(method="mats", alpha=0.6, iterations=2), batches_of)
    assert not torch.allclose(two_steps["proj.weight"].sum(0), exact["proj.weight"].sum(0), atol=1e-3)


def test_fisher_merge_is_its_formula_over_a_plain_experts_fisher():
    """The teacher-mode Fisher equals the squared gradients of a plain folded expert; the merge is
    sum_k w_k (F_k + eps) theta_k / sum_k w_k (F_k + eps) with w_k ~ 1 / (||F_k|| + eps)."""
    parts = tiny_parts()
    data = TaskDataModule(parts.rows, Collator(parts.tokenizer), batch_size=4, shuffle=False)
    spec = ClosedForm(method="fisher", examples=8, positions="last")
    teacher = MergedModel(parts.pool.base, parts.task_vectors, Task(init=0.0))
    scorer = Objective(positions="last")
    scorer.setup(teacher, data, parts.tokenizer)
    fishers = []
    for task in teacher.experts:
        with teacher.as_expert(task):
            fishers.append(expert_fisher(teacher, expert_batches(teacher, data.loader(task), scorer, 8)))
            plain = teacher.fold().requires_grad_(True)
        expected = {n: torch.zeros_like(p) for n, p in plain.named_parameters()}
        for inputs, scored in expert_batches(plain, data.loader(task), scorer, 8):
            plain.zero_grad()
            label_expectation(plain(**inputs).logits[:, -1:], scored).backward()
            for n, p in plain.named_parameters():
                expected[n] += p.grad.square()
        for n in teacher.names:
            assert torch.allclose(fishers[-1][n], expected[n] / 8, rtol=1e-4, atol=1e-10), n
        assert all(fishers[-1][n].max() > 0 for n in teacher.names if "layers" in n)
    tv = closed_form_task_vectors(parts.task_vectors, parts.pool.base, data, spec, parts.tokenizer)
    w = fisher_weights(fishers, spec)
    norms = torch.stack([torch.cat([f.flatten() for f in fisher.values()]).double().norm() for fisher in fishers])
    assert torch.allclose(w, (1 / (norms + 1e-6)) / (1 / (norms + 1e-6)).sum())
    for n in ("model.layers.0.self_attn.q_proj.weight", "model.norm.weight"):
        w0 = parts.pool.base.get_parameter(n).detach().double()
        thetas = [w0 + parts.task_vectors.stacks[n][k].double() for k in range(2)]
        num = sum(w[k] * (fishers[k][n].double() + 1e-6) * thetas[k] for k in range(2))
        den = sum(w[k] * (fishers[k][n].double() + 1e-6) for k in range(2))
        assert torch.allclose(w0 + tv.stacks[n].double().sum(0), num / den, atol=1e-6), n
        assert not torch.allclose(num / den, (thetas[0] + thetas[1]) / 2, atol=1e-4)  # not the plain average


def test_closed_form_options_are_checked():
    with pytest.raises(AdamergeError, match="closed_form.method='regmeen'"):
        ClosedForm(method="regmeen")
    with pytest.raises(AdamergeError, match="closed_form.alpha"):
        ClosedForm(method="regmean", alpha=1.5)


def composed_config(*overrides: str) -> dict:
    with initialize_config_module("adamerge.conf", version_base=None):
        return as_dict(compose("config", overrides=open_mapping_overrides(list(overrides))))


def pieces_as_run_computes_them(zoo, *overrides: str):
    """W0 and the closed-form pieces, through the blocks ``run`` uses (same data, same order)."""
    cfg = composed_config(*zoo.cli_args(), *overrides, "output_dir=null")
    pool = build_pool(cfg["pool"])
    tokenizer = build_tokenizer(pool)
    objective = construct(OBJECTIVES, "objective", cfg["objective"])
    rows = load_calibration(cfg["data"], pool.expert_names, objective, True)
    data = build_datamodule(cfg["data"], rows, tokenizer, objective, True, 0, max_positions(pool.base),
                            pool.base.config.bos_token_id)
    tv = closed_form_task_vectors(build_task_vectors(pool, cfg["pool"]), pool.base, data,
                                  closed_form_options(cfg["closed_form"]), tokenizer)
    return dict(pool.base.named_parameters()), tv.stacks


def written(output_dir) -> dict[str, torch.Tensor]:
    return load_file(str(output_dir / "model.safetensors"))


QUIET = ["logger=none", "trainer.enable_progress_bar=false", "trainer.enable_checkpointing=false",
         "trainer.accelerator=cpu", "data.batch_size=4"]


def test_regmean_preset_writes_the_closed_form_and_a_learned_run_composes_on_top(tmp_path):
    """``method=regmean`` writes W0 + sum_k piece_k (RegMean on linear weights, the average elsewhere), and
    ``adamerge fold`` writes it again;
    AdaMerging task-wise with ``closed_form.method=regmean`` and init 1 learns c and writes W0 + sum_k c_k piece_k."""
    zoo = write_zoo(tmp_path / "zoo")
    w0, pieces = pieces_as_run_computes_them(zoo, "method=regmean", *QUIET)
    linear, norm = "model.layers.0.mlp.down_proj.weight", "model.norm.weight"

    static = run(composed_config(*zoo.cli_args(), "method=regmean", *QUIET, f"output_dir={tmp_path / 'rm'}"),
                 tmp_path / "run_rm")
    weights = written(static.output_dir)
    assert torch.allclose(weights[linear], w0[linear] + pieces[linear].sum(0), atol=1e-6)
    raw = build_task_vectors(build_pool(composed_config(*zoo.cli_args(), "output_dir=null")["pool"]), {})
    assert torch.allclose(weights[norm], w0[norm] + raw.stacks[norm].mean(0), atol=1e-6)
    assert not torch.allclose(weights[linear], w0[linear] + raw.stacks[linear].mean(0), atol=1e-4)
    again = written(refold(static.output_dir, tmp_path / "refolded"))  # the pieces computed again from the data
    assert all(torch.equal(again[n], weights[n]) for n in weights)

    learned = run(composed_config(*zoo.cli_args(), "method=adamerging_task", "closed_form.method=regmean",
                                  "granularity.init=1.0", "granularity.transform=identity", "trainer.max_steps=2",
                                  "trainer.accumulate_grad_batches=1", "optim.lr=0.05", *QUIET,
                                  f"output_dir={tmp_path / 'ada'}"), tmp_path / "run_ada")
    c = learned.coefficients["task"].flatten()
    assert not torch.allclose(c, torch.ones_like(c))  # the coefficients moved off the closed form
    expected = w0[linear] + (c.view(-1, 1, 1) * pieces[linear]).sum(0)
    assert torch.allclose(written(learned.output_dir)[linear], expected, atol=1e-5)


def test_closed_form_needs_calibration_data(tmp_path):
    zoo = write_zoo(tmp_path / "zoo")
    args = [a for a in zoo.cli_args() if not a.startswith("data.paths")]
    with pytest.raises(AdamergeError, match="closed_form.method=fisher needs calibration data"):
        run(composed_config(*args, "method=fisher", *QUIET, "output_dir=null"), tmp_path / "run")


def test_plan_counts_the_gram_matrices(tmp_path):
    """``adamerge plan`` with method=regmean: 2 sum in_features^2 fp32 (one expert's Gram matrices and their
    sum) plus each expert's fp32 G tau, over the merged Linear weights; nothing for a data-free method."""
    zoo = write_zoo(tmp_path / "zoo")
    base = build_pool(composed_config(*zoo.cli_args(), "output_dir=null")["pool"]).base
    linears = [m for m in base.modules() if isinstance(m, nn.Linear)]
    expected = 4 * 2 * sum(m.in_features ** 2 for m in linears) + 4 * 2 * sum(m.weight.numel() for m in linears)
    plan = make_plan(composed_config(*zoo.cli_args(), "method=regmean", "output_dir=null"))
    assert plan.parts["closed_form"] == expected
    assert any(line.component == "closed-form statistics" for line in plan.lines)
    assert make_plan(composed_config(*zoo.cli_args(), "method=task_arithmetic", "output_dir=null")
                     ).parts["closed_form"] == 0
