"""Concrete masks (Concrete subspace learning, arXiv 2312.06173; adamerge/masks.py): relaxed while the
mask learns (inside (0, 1), with gradients), hard and binary at the fold (``W0 + sum_k c_k (m ⊙ tau_k)``);
the mask's steps and the coefficients' steps; a learned run of both; saved with the coefficients so that
``adamerge fold`` gives the same model; bad options; the presets' values."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from tiny import assert_refold_writes_the_same, build_module, quiet_trainer, tiny_parts

from adamerge import AdamergeError, MergedModel
from adamerge.granularity import Block, Layer

K = 3
NAME = "model.layers.0.mlp.up_proj.weight"


def masked(family, mask, granularity=Layer, **options) -> MergedModel:
    pool, tv = family.pooled
    return MergedModel(pool.base, tv, granularity(mask=mask, **options))


@torch.no_grad()
def random_logits(merged: MergedModel, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in merged.granularity.mask.logits.values():
        p.copy_(torch.randn(p.shape, generator=gen))


def toy_loss(merged: MergedModel, family) -> torch.Tensor:
    return merged(**family.inputs).logits.square().mean()


def test_the_relaxed_mask_is_inside_zero_one_and_carries_gradients(llama_family):
    merged = masked(llama_family, {"kind": "shared", "rescale": False})
    mask = merged.granularity.mask
    mask.begin_step(0)  # steps: null, so the mask and the coefficients learn together
    m = mask.value(NAME)
    assert m.shape == (1, *llama_family.infos()[NAME].shape) and m.requires_grad
    assert m.min() > 0 and m.max() < 1 and not torch.equal(m, mask.value(NAME))  # a fresh sample per call
    toy_loss(merged, llama_family).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mask.logits.values())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in merged.granularity.raw.values())


def test_the_mask_learns_alone_for_its_steps_then_is_hard(llama_family):
    merged = masked(llama_family, {"steps": 2})
    g = merged.granularity
    g.mask.begin_step(1)
    toy_loss(merged, llama_family).backward()
    assert all(p.grad is None for p in g.raw.values())  # coefficients fixed: Adam skips them
    assert all(p.grad is not None for p in g.mask.logits.values())
    g.zero_grad(set_to_none=True)
    g.mask.begin_step(2)
    toy_loss(merged, llama_family).backward()
    assert all(p.grad is not None for p in g.raw.values())
    assert all(p.grad is None for p in g.mask.logits.values())  # hard: no gradient to the logits
    assert torch.equal(g.mask.value(NAME), torch.ones_like(g.mask.logits[NAME.replace(".", "/")]))  # logits at 0: kept


@pytest.mark.parametrize("kind", ["shared", "per_task"])
@pytest.mark.parametrize("rescale", [False, True])
def test_the_fold_applies_the_hard_binary_mask(llama_family, kind, rescale):
    merged = masked(llama_family, {"kind": kind, "rescale": rescale})
    random_logits(merged)
    g = merged.granularity
    g.load_table({n: torch.tensor([[0.2], [0.5], [0.9]]) * (1 + i / 10) for i, n in enumerate(merged.names)})
    g.mask.begin_step(0)  # even while the mask learns, the fold (no autograd) takes the hard mask
    folded = dict(merged.fold().named_parameters())
    pool, tv = llama_family.pooled
    w0 = dict(pool.base.named_parameters())
    for name in merged.names:
        logits = g.mask.logits[name.replace(".", "/")].detach()
        m = (logits > 0).float() + (logits == 0).float()  # the Bernoulli's mode, ties kept
        assert 0.2 < m.mean() < 0.8  # a mask that drops and keeps
        scale = m / m.flatten(1).mean(1).view(-1, *[1] * (m.dim() - 1)) if rescale else m
        c = g.table()[name].view(K, *[1] * (m.dim() - 1))
        torch.testing.assert_close(folded[name], w0[name] + (c * scale * tv.stacks[name]).sum(0))
        if kind == "shared":  # elements the mask drops keep W0 exactly, the others get the whole merge
            dropped = m[0] == 0
            assert torch.equal(folded[name][dropped], w0[name][dropped])
            kept = (c * tv.stacks[name]).sum(0)[~dropped] * (scale[0][~dropped] if rescale else 1)
            torch.testing.assert_close(folded[name][~dropped] - w0[name][~dropped], kept)


class Snapshot(pl.Callback):
    """The mask logits and the coefficients as step ``step`` starts."""

    def __init__(self, step: int) -> None:
        self.step, self.logits, self.coefficients = step, None, None

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            g = module.merged.granularity
            self.logits = {k: p.detach().clone() for k, p in g.mask.logits.items()}
            self.coefficients = {k: c.clone() for k, c in g.table().items()}


def changed(before: dict, after: dict) -> bool:
    return any(not torch.equal(before[k], after[k]) for k in before)


@pytest.fixture(scope="module")
def parts():
    return tiny_parts()


def test_mask_before_coefficients_in_one_learned_run(parts):
    """Concrete AdaMerging: the mask learns for 2 steps at the initial coefficients, then layer-wise
    AdaMerging learns the coefficients for 2 under the hard mask."""
    granularity = {"name": "layer", "init": 0.3, "mask": {"steps": 2, "lr": 0.1}}
    merged, data, module = build_module(parts, granularity, {"name": "entropy"}, batch_size=4)
    g = merged.granularity
    start = {k: c.clone() for k, c in g.table().items()}
    snapshot = Snapshot(2)
    trainer = quiet_trainer(4, callbacks=[snapshot])
    trainer.fit(module, datamodule=data)
    assert not changed(start, snapshot.coefficients) and changed(snapshot.coefficients, g.table())
    zero = {k: torch.zeros_like(v) for k, v in snapshot.logits.items()}
    assert changed(zero, snapshot.logits)
    assert not changed(snapshot.logits, {k: p.detach() for k, p in g.mask.logits.items()})
    assert [group["lr"] for group in trainer.optimizers[0].param_groups] == [0.05, 0.1]
    assert not g.mask.learning and 0 < g.mask.density() < 1


def test_mask_and_coefficients_learn_together(parts):
    merged, data, module = build_module(parts, {"name": "layer", "init": 0.3, "mask": "shared"}, {"name": "entropy"},
                                        batch_size=4)
    g = merged.granularity
    start = {k: c.clone() for k, c in g.table().items()}
    quiet_trainer(2).fit(module, datamodule=data)
    assert changed(start, g.table())
    assert any(p.detach().abs().sum() > 0 for p in g.mask.logits.values())
    assert set(module.trainable()) >= {f"merged.granularity.mask.logits.{k}" for k in g.mask.logits}  # checkpointed


def test_refold_reproduces_the_masked_merge(tmp_path):
    """A Concrete AdaMerging run (1 mask step, 1 coefficient step) refolded by ``adamerge fold``."""
    from hydra import compose, initialize_config_module
    from safetensors.torch import load_file
    from tiny import write_zoo

    from adamerge.__main__ import open_mapping_overrides
    from adamerge.run import run

    zoo = write_zoo(tmp_path / "zoo", rows=4)
    overrides = [*zoo.cli_args(), "method=concrete_adamerging", "trainer.max_steps=2", "granularity.mask.steps=1",
                 "optim.lr=0.1", "data.batch_size=4", "trainer.accelerator=cpu", "trainer.enable_checkpointing=false",
                 "trainer.enable_progress_bar=false", "logger=none", f"output_dir={tmp_path / 'out'}", "seed=3"]
    with initialize_config_module("adamerge.conf", version_base=None):
        cfg = compose("config", overrides=open_mapping_overrides(overrides))
    run(cfg, tmp_path / "run")
    saved = load_file(tmp_path / "out" / "adamerge_coefficients.safetensors")
    logits = {k: v for k, v in saved.items() if k.startswith("granularity.mask.")}
    assert logits and any(v.abs().sum() > 0 for v in logits.values())
    card = (tmp_path / "out" / "README.md").read_text()
    assert "Concrete AdaMerging" in card and "% of the task vectors' elements" in card
    assert_refold_writes_the_same(tmp_path / "out", tmp_path / "again")


def test_resume_after_the_mask_steps_gives_the_same_merge(tmp_path):
    """Checkpoints hold the mask logits: 3 steps (2 of them the mask's), resumed to 4, equal 4 in one go."""
    from hydra import compose, initialize_config_module
    from safetensors.torch import load_file
    from tiny import write_zoo

    from adamerge.__main__ import open_mapping_overrides
    from adamerge.run import run

    zoo = write_zoo(tmp_path / "zoo", rows=4)

    def merge(name: str, *extra: str) -> dict[str, torch.Tensor]:
        overrides = [*zoo.cli_args(), "method=concrete_adamerging", "granularity.mask.steps=2", "optim.lr=0.1",
                     "data.batch_size=4", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "logger=none",
                     "checkpoint.every_n_steps=1", f"output_dir={tmp_path / name}", "seed=3", *extra]
        with initialize_config_module("adamerge.conf", version_base=None):
            run(compose("config", overrides=open_mapping_overrides(overrides)), tmp_path / f"run_{name}")
        return load_file(tmp_path / name / "model.safetensors")

    whole = merge("whole", "trainer.max_steps=4")
    merge("part", "trainer.max_steps=3")
    checkpoint = torch.load(tmp_path / "run_part" / "checkpoints" / "last.ckpt", weights_only=False)
    assert any(".mask.logits." in k for k in checkpoint["state_dict"])
    resumed = merge("resumed", "trainer.max_steps=4", f"resume={tmp_path / 'run_part' / 'checkpoints' / 'last.ckpt'}")
    for name, value in whole.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=0)


def test_block_partitions_and_mask_are_both_saved(llama_family):
    g = masked(llama_family, "per_task", Block, partitions=3).granularity
    saved = g.state_tensors()
    assert {k.split(".")[1] for k in saved} == {"partition", "mask"}
    other = masked(llama_family, "per_task", Block, partitions=3, seed=9).granularity
    with torch.no_grad():
        for p in g.mask.logits.values():
            p.fill_(-1.0)
    other.load_state_tensors(g.state_tensors())
    assert all(torch.equal(other.state_tensors()[k], v) for k, v in g.state_tensors().items())
    with pytest.raises(AdamergeError, match="no mask logits"):
        masked(llama_family, "shared").granularity.load_state_tensors({})


@pytest.mark.parametrize("options, message", [
    ({"kind": "both"}, r"granularity\.mask\.kind='both'"),
    ({"temperature": 0}, r"granularity\.mask\.temperature=0"),
    ({"steps": -1}, r"granularity\.mask\.steps=-1"),
    ({"init_logits": float("nan")}, r"granularity\.mask\.init_logits"),
    ({"sparsity": 0.5}, r"granularity\.mask: .*sparsity"),
    (3, r"granularity\.mask must be"),
])
def test_bad_mask_options(options, message):
    with pytest.raises(AdamergeError, match=message):
        Layer(mask=options)


def test_the_mask_needs_task_vector_space():
    with pytest.raises(AdamergeError, match="space=task_vectors"):
        Layer(mask="shared", space="weights")
    assert Layer(mask="none").mask is None and Layer().mask is None


def test_the_presets_carry_the_released_codes_values():
    from hydra import compose, initialize_config_module

    from adamerge.__main__ import open_mapping_overrides

    with initialize_config_module("adamerge.conf", version_base=None):
        ta = compose("config", overrides=open_mapping_overrides(["method=concrete_ta"]))
        ada = compose("config", overrides=open_mapping_overrides(["method=concrete_adamerging"]))
    assert (ta.granularity.name, ta.granularity.init, ta.granularity.mask.steps, ta.trainer.max_steps) == (
        "task", 0.3, 2000, 2000)
    assert (ada.granularity.name, ada.granularity.transform, ada.granularity.mask.steps, ada.trainer.max_steps) == (
        "layer", "identity", 1000, 2000)
    for cfg in (ta, ada):
        mask = cfg.granularity.mask
        assert (mask.kind, mask.temperature, mask.init_logits, mask.rescale, cfg.optim.lr) == (
            "shared", 0.5, 0.0, True, 1e-3)


def test_bad_mask_options_are_refused_before_loading(tmp_path):
    from hydra import compose, initialize_config_module

    from adamerge.__main__ import open_mapping_overrides
    from adamerge.run import run

    overrides = ["method=concrete_ta", "granularity.mask.kind=both", "pool.base=/nonexistent/base", "output_dir=null",
                 "trainer.max_steps=0", "logger=none"]
    with initialize_config_module("adamerge.conf", version_base=None):
        cfg = compose("config", overrides=open_mapping_overrides(overrides))
    with pytest.raises(AdamergeError, match=r"granularity\.mask\.kind='both'"):
        run(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())
