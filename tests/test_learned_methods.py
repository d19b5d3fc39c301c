"""WUDI-Merging, FW-Merging and Sens-Merging as their papers define them: each pinned against a few lines of
reference written here, on the tiny zoo, plus one learned run composed on top of each."""

from __future__ import annotations

import pytest
import torch
from tiny import assert_refold_writes_the_same, build_module, quiet_trainer, tiny_parts
from torch import nn

from adamerge import Layer, MergedModel
from adamerge.datamodule import DataFree
from adamerge.objectives import Wudi
from adamerge.objectives.wudi import interference_and_grad
from adamerge.pool import ExpertPool
from adamerge.training import MergeModule


@pytest.fixture(scope="module")
def parts():
    return tiny_parts()


def fit_steps(module: MergeModule, steps: int, data=None) -> None:
    quiet_trainer(steps).fit(module, datamodule=data or DataFree(steps))


# ---- WUDI-Merging ---------------------------------------------------------------------------------------


def wudi_reference(merged_delta: torch.Tensor, stack: torch.Tensor) -> torch.Tensor:
    """The code's loss: sum((tau_m - tau_k) @ tau_k^T)^2 / ||tau_k||^2, summed over k."""
    total = torch.zeros(())
    for tau in stack:
        total = total + ((merged_delta - tau) @ tau.T).pow(2).sum() / tau.pow(2).sum()
    return total


def wudi_model(parts, init="uniform") -> tuple[MergedModel, Wudi]:
    merged = MergedModel(parts.pool.base, parts.task_vectors, Layer(init=init))
    objective = Wudi()
    objective.setup(merged, None)
    return merged, objective


def test_wudi_loss_is_its_formula_and_decreases(parts):
    merged, objective = wudi_model(parts)
    assert set(objective.names) == {n for n in merged.names if merged.stack(n).dim() == 3}
    assert "model.layers.0.mlp.up_proj.weight" in objective.grams  # (64, 32): the cheaper Gram side
    assert "model.layers.0.mlp.down_proj.weight" not in objective.grams  # (32, 64): the direct product
    with torch.no_grad():
        for delta in objective.merged_deltas.values():  # away from the init, where the loss is not trivial
            delta.mul_(0.5)
    loss = objective.task_loss(merged, "all", {})
    reference = sum(wudi_reference(objective.merged_deltas[n.replace(".", "/")].detach(), merged.stack(n))
                    for n in objective.names)
    torch.testing.assert_close(loss.detach(), reference, rtol=1e-4, atol=0)
    module = MergeModule(merged, objective, {"name": "adam", "lr": 1e-3})
    assert set(module.trainable()) == {f"extra.{i}" for i in range(len(objective.names))}  # coefficients frozen
    fit_steps(module, 5)
    assert objective.task_loss(merged, "all", {}) < loss


def test_wudi_with_one_expert_reproduces_it():
    """One linear layer, one expert, tau_m started at 0: the optimum is tau itself (full column rank)."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 9, bias=False))
    expert = nn.Sequential(nn.Linear(6, 9, bias=False))
    pool = ExpertPool(base, {"only": lambda: expert})
    merged = MergedModel(pool.base, pool.task_vectors(), Layer(init=1.0))
    objective = Wudi()
    objective.setup(merged, None)
    tau = (expert[0].weight - base[0].weight).detach()
    with torch.no_grad():
        objective.merged_deltas["0/weight"].zero_()
    optimizer = torch.optim.Adam(objective.extra_parameters(), lr=0.02)
    for _ in range(600):
        optimizer.zero_grad()
        objective.task_loss(merged, "all", {}).backward()
        optimizer.step()
    torch.testing.assert_close(objective.merged_deltas["0/weight"].detach(), tau, atol=2e-3, rtol=0)
    objective.finish(merged)
    torch.testing.assert_close(merged.fold()[0].weight, base[0].weight + objective.merged_deltas["0/weight"])


@pytest.mark.parametrize("shape", [(5, 3), (3, 5)])  # the Gram side and the direct product
def test_wudi_gradient_is_the_formulas(shape):
    gen = torch.Generator().manual_seed(1)
    stack = torch.randn(3, *shape, generator=gen)
    delta = torch.randn(shape, generator=gen, requires_grad=True)
    wudi_reference(delta, stack).backward()
    gram = stack.transpose(1, 2) @ stack if shape[1] < shape[0] else None
    loss, grad = interference_and_grad(delta.detach(), stack, gram)
    torch.testing.assert_close(loss, wudi_reference(delta.detach(), stack))
    torch.testing.assert_close(grad, delta.grad)


def test_wudi_interference_skips_unchanged_experts():
    tau, delta = torch.randn(3, 4), torch.randn(3, 4)
    alone = interference_and_grad(delta, tau[None])
    with_unchanged = interference_and_grad(delta, torch.stack([tau, torch.zeros(3, 4)]))
    torch.testing.assert_close(with_unchanged, alone)


def test_wudi_folds_to_the_merged_delta_and_refolds_from_its_state(parts):
    merged, objective = wudi_model(parts)
    fit_steps(MergeModule(merged, objective, {"name": "adam", "lr": 1e-3}), 2)
    objective.finish(merged)
    w0, weights = dict(parts.pool.base.named_parameters()), merged.merge()
    for name in merged.names:
        expected = (w0[name] + objective.merged_deltas[name.replace(".", "/")] if name in objective.names
                    else w0[name] + parts.task_vectors.stacks[name].mean(0))
        torch.testing.assert_close(weights[name], expected.detach(), rtol=0, atol=1e-6)
    again, fresh = MergedModel(parts.pool.base, parts.task_vectors, Layer(init="uniform")), Wudi()
    fresh.load_state_tensors(again, objective.state_tensors())
    for name in objective.names:
        torch.testing.assert_close(again.merge()[name], weights[name], rtol=0, atol=1e-6)


def test_adamerging_learns_on_top_of_wudi(parts):
    """WUDI first (data-free), then layer-wise AdaMerging on the WUDI-adjusted task vectors: it starts at the
    WUDI merge and moves the coefficients from there."""
    merged, objective = wudi_model(parts)
    fit_steps(MergeModule(merged, objective, {"name": "adam", "lr": 1e-3}), 2)
    objective.finish(merged)
    wudi_weights = {n: w.detach().clone() for n, w in merged.merge().items()}
    merged.granularity.requires_grad_(True)
    _, data, entropy = build_module(parts, {"name": "layer"}, {"name": "entropy"})
    ada = MergeModule(merged, entropy.objective, {"name": "adam", "lr": 0.05})
    before = {k: c.clone() for k, c in merged.granularity.table().items()}
    fit_steps(ada, 2, data)
    after = merged.granularity.table()
    assert any(not torch.equal(after[k], before[k]) for k in before)
    merged.granularity.load_table(before)
    for name, w in merged.merge().items():
        torch.testing.assert_close(w, wudi_weights[name], rtol=0, atol=1e-6)


# ---- Sens-Merging ---------------------------------------------------------------------------------------


def reference_sens(parts, data, temperature: float, scale: float) -> dict[str, torch.Tensor]:
    """The paper's formulas on the experts as separate models: HF's label loss (pads and the first real
    token, which only a pad predicts, masked), sum |theta * grad| per block, logit distances, softmax."""
    from tiny import tiny_expert

    experts = [tiny_expert(parts.pool.base, k).requires_grad_(True) for k in range(len(parts.task_vectors.experts))]
    tasks = parts.task_vectors.experts
    sens = []
    for k, task in enumerate(tasks):
        sums: dict[str, float] = {}
        for batch in data.loader(task, shuffle=False):
            labels = batch["input_ids"].masked_fill(~batch["attention_mask"].bool(), -100)
            labels[:, 1:][batch["attention_mask"][:, :-1] == 0] = -100
            experts[k].zero_grad()
            experts[k](input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"], labels=labels).loss.backward()
            for name, p in experts[k].named_parameters():
                layer = ".".join(name.split(".")[:3]) if ".layers." in name else name
                sums[layer] = sums.get(layer, 0.0) + (p * p.grad).abs().sum().item()
        sens.append(sums)
    layers = sorted(sens[0])
    s = torch.tensor([[x[layer] for layer in layers] for x in sens])
    alpha = s / s.norm(dim=1, keepdim=True)
    gaps = torch.zeros(len(tasks), len(tasks))
    with torch.no_grad():
        for i in range(len(tasks)):
            for j, task in enumerate(tasks):
                if i != j:
                    per_batch = []
                    for batch in data.loader(task, shuffle=False):
                        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
                        diff = experts[i](**inputs).logits - experts[j](**inputs).logits
                        per_batch.append(diff.norm(dim=-1)[batch["attention_mask"].bool()].mean())
                    gaps[i, j] = torch.stack(per_batch).mean()
    tau = gaps.sum(1) / gaps.sum()
    sigma = torch.softmax(alpha * tau[:, None] / temperature, dim=0)
    return {layer: scale * len(tasks) * sigma[:, i] for i, layer in enumerate(layers)}


def test_sens_init_is_its_formula(parts):
    from adamerge.sensitivity import layer_of, sens_table

    merged, data, _ = build_module(parts, {"name": "layer"}, {"name": "entropy"}, batch_size=4)
    table = sens_table(merged, data, temperature=0.05, scale=0.3)
    reference = reference_sens(parts, data, temperature=0.05, scale=0.3)
    assert set(table) == set(merged.names)  # layer-wise: one group per tensor
    for name, coefficients in table.items():
        torch.testing.assert_close(coefficients[:, 0], reference[layer_of(name)], rtol=1e-4, atol=1e-6)
    spread = torch.stack([c[:, 0] for c in table.values()])
    assert spread.std(0).max() > 1e-3  # the layers really differ (the test would pass on constants otherwise)


def test_sens_init_refuses_a_granularity_across_layers(parts):
    from adamerge import AdamergeError
    from adamerge.sensitivity import sens_table

    merged, data, _ = build_module(parts, {"name": "task"}, {"name": "entropy"})
    with pytest.raises(AdamergeError, match="spans"):
        sens_table(merged, data)


def test_adamerging_learns_from_the_sens_init(parts):
    from adamerge.sensitivity import sens_table

    merged, data, module = build_module(parts, {"name": "layer", "transform": "clamp"}, {"name": "entropy"})
    start = sens_table(merged, data, scale=0.3)
    merged.granularity.load_table(start)
    torch.testing.assert_close(merged.granularity.table(), start)
    fit_steps(module, 2, data)
    moved = merged.granularity.table()
    assert any(not torch.allclose(moved[k], start[k]) for k in start)


# ---- FW-Merging -----------------------------------------------------------------------------------------


def in_hull(c: torch.Tensor) -> bool:
    """Every column in the hull of the base (0) and the experts (e_k): c >= 0, sum_k c_k <= 1."""
    return bool((c >= -1e-6).all() and (c.sum(0) <= 1 + 1e-6).all())


def test_frank_wolfe_moves_toward_the_oracle_vertex():
    from adamerge.frank_wolfe import FrankWolfe

    c = nn.Parameter(torch.full((3, 4), 0.2))
    c.grad = torch.tensor([[-1.0, 0.5, 0.2, -0.1],
                           [-3.0, 0.1, -0.4, 0.3],
                           [0.0, 0.2, -0.5, -0.2]])
    vertex = torch.tensor([[0.0, 0, 0, 0], [1, 0, 0, 0], [0, 0, 1, 1]])  # argmin if negative, else the base
    optimizer = FrankWolfe([c], lr=0.5)
    optimizer.step()  # gamma_0 = 0.5 * 2 / 2
    torch.testing.assert_close(c.detach(), 0.5 * torch.full((3, 4), 0.2) + 0.5 * vertex)
    before = c.detach().clone()
    optimizer.step()  # same gradient, gamma_1 = 0.5 * 2 / 3
    torch.testing.assert_close(c.detach(), before + (1 / 3) * (vertex - before))


def test_frank_wolfe_stays_in_the_hull():
    from adamerge.frank_wolfe import FrankWolfe

    gen = torch.Generator().manual_seed(0)
    c = nn.Parameter(torch.full((4, 6), 0.25))
    optimizer = FrankWolfe([c], lr=1.0)
    for _ in range(20):
        c.grad = torch.randn(c.shape, generator=gen)
        optimizer.step()
        assert in_hull(c.detach())


def test_frank_wolfe_trains_the_coefficients_through_lightning(parts):
    merged, data, module = build_module(parts, {"name": "layer", "init": 0.3}, {"name": "ce"},
                                        {"name": "frank_wolfe", "lr": 1.0})
    fit_steps(module, 2, data)
    table = merged.granularity.table()
    assert all(in_hull(c) for c in table.values())
    assert any(not torch.allclose(c, torch.full_like(c, 0.3)) for c in table.values())


@pytest.mark.parametrize(("config", "name"), [
    ({"objective": {"name": "wudi"}, "trainer": {"max_steps": 400}}, "WUDI-Merging"),
    ({"objective": {"name": "ce"}, "optim": {"name": "frank_wolfe"}, "trainer": {"max_steps": 10}}, "FW-Merging"),
    ({"granularity": {"name": "layer", "init": "sens"}, "trainer": {"max_steps": 0}}, "Sens-Merging"),
])
def test_the_card_names_the_method(config, name):
    from adamerge.card import PAPERS, method_name

    assert method_name(config) == name and name in PAPERS


def test_sens_preset_runs_from_the_cli_config(tmp_path):
    """``method=sens_merging``: the run's coefficients are Sens-Merging's (computed from the calibration data,
    not the provisional init), and without data the run says so before any training."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf
    from tiny import write_zoo

    from adamerge import AdamergeError
    from adamerge.overrides import open_mapping_overrides
    from adamerge.run import run

    zoo = write_zoo(tmp_path / "zoo", rows=4)
    overrides = [*zoo.cli_args(), "method=sens_merging", "logger=none", "output_dir=null", "data.batch_size=2",
                 "trainer.accelerator=cpu"]
    with initialize_config_module("adamerge.conf", version_base=None):
        cfg = compose("config", overrides=open_mapping_overrides(overrides))
    result = run(cfg, tmp_path / "run")
    values = torch.cat(list(result.coefficients.values()), dim=1)
    assert values.std() > 0 and not torch.allclose(values, torch.full_like(values, 0.3))
    assert torch.allclose(values.mean(0), torch.full((values.shape[1],), 0.3))  # scale * K * softmax: mean 0.3
    no_data = OmegaConf.to_container(cfg, resolve=True)
    no_data["data"]["paths"] = {}
    with pytest.raises(AdamergeError, match="granularity.init=sens computes the coefficients from calibration data"):
        run(OmegaConf.create(no_data), tmp_path / "run2")
    assert not (tmp_path / "run2").exists()  # refused before anything was loaded or written


def test_plan_counts_wudi_state():
    from adamerge.plan import OPTIMIZER_STATES, wudi_state

    matrices = {"tall": (8, 4), "wide": (4, 8)}  # only the tall one keeps Gram matrices (4 x 4 per expert)
    total, note = wudi_state({"name": "wudi"}, matrices, 3, steps=10)
    assert total == 4 * (3 + OPTIMIZER_STATES) * 64 + 4 * 3 * 16 and "Gram" in note
    assert wudi_state({"name": "wudi"}, matrices, 3, steps=0) == (0, "")


def test_frank_wolfe_refuses_what_the_hull_cannot_constrain(tmp_path):
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf
    from tiny import write_zoo

    from adamerge import AdamergeError
    from adamerge.checks import check_before_loading
    from adamerge.frank_wolfe import check_frank_wolfe
    from adamerge.objectives import OBJECTIVES
    from adamerge.overrides import open_mapping_overrides

    with pytest.raises(AdamergeError, match="tensors of its own"):
        check_frank_wolfe("identity", Wudi())
    check_frank_wolfe("identity", OBJECTIVES["ce"]())
    zoo = write_zoo(tmp_path / "zoo", rows=2)
    overrides = [*zoo.cli_args(), "method=fw_merging", "granularity.transform=clamp", "output_dir=null"]
    with initialize_config_module("adamerge.conf", version_base=None):
        cfg = OmegaConf.to_container(compose("config", overrides=open_mapping_overrides(overrides)), resolve=True)
    with pytest.raises(AdamergeError, match="needs granularity.transform=identity, not 'clamp'"):
        check_before_loading(cfg, tmp_path / "run")


def test_wudi_run_refolds_to_the_same_weights(tmp_path):
    """``method=wudi`` writes its merged deltas beside the coefficients; ``adamerge fold`` rebuilds the same model."""
    from hydra import compose, initialize_config_module
    from safetensors.torch import load_file
    from tiny import write_zoo

    from adamerge.overrides import open_mapping_overrides
    from adamerge.run import run

    zoo = write_zoo(tmp_path / "zoo", rows=2)
    overrides = [*zoo.cli_args(), "method=wudi", "trainer.max_steps=3", "optim.lr=1e-3", "logger=none",
                 "trainer.accelerator=cpu", "trainer.enable_checkpointing=false", "trainer.enable_progress_bar=false",
                 f"output_dir={tmp_path / 'out'}"]
    with initialize_config_module("adamerge.conf", version_base=None):
        run(compose("config", overrides=open_mapping_overrides(overrides)), tmp_path / "run")
    saved = load_file(tmp_path / "out" / "adamerge_coefficients.safetensors")
    assert any(k.startswith("objective.merged_delta.") for k in saved)
    assert_refold_writes_the_same(tmp_path / "out", tmp_path / "again")
