"""Method presets (``method=NAME``, conf/method): each cites the code its values come from, composes
and runs a step on the tiny zoo; the README's method table lists every preset."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from tiny import write_zoo

from adamerge.loading import as_dict, build_pool, prepare_task_vectors, raw_task_vectors
from adamerge.overrides import open_mapping_overrides
from adamerge.run import run
from adamerge.training import build_schedule

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted(p.stem for p in (ROOT / "conf" / "method").glob("*.yaml"))
# one short run per preset: steps, and the rows per task and step (tiny data)
SHORT = ["trainer.max_steps=1", "data.batch_size=2", "trainer.accumulate_grad_batches=1", "logger=none",
         "output_dir=null", "trainer.enable_progress_bar=false", "trainer.enable_checkpointing=false",
         "trainer.accelerator=cpu"]


def composed(*overrides: str):
    with initialize_config_module("adamerge.conf", version_base=None):
        return compose("config", overrides=open_mapping_overrides(list(overrides)))


def test_the_issue_presets_exist():
    required = {"task_arithmetic", "average", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties",
                "della", "adamerging_task", "adamerging_layer", "adamerging_pp", "atlas", "expert_merging",
                "expert_merging_pp", "dam", "doge"}
    assert required <= set(PRESETS)


def test_every_preset_cites_its_source():
    for name in PRESETS:
        text = (ROOT / "conf" / "method" / f"{name}.yaml").read_text()
        assert text.startswith("# @package _global_"), name
        assert re.search(r"arXiv \d{4}\.\d{5}", text), f"{name}: no arXiv id"
        assert re.search(r"github\.com/[\w.-]+/[\w.-]+", text), f"{name}: no repository"


def test_any_key_of_a_preset_can_be_overridden():
    cfg = composed("method=adamerging_task", "granularity=layer", "optim.lr=0.01", "trainer.max_steps=7")
    assert (cfg.granularity.name, cfg.granularity.init, cfg.granularity.transform) == ("layer", 0.3, "clamp")
    assert (cfg.optim.name, cfg.optim.lr, cfg.trainer.max_steps) == ("adam", 0.01, 7)


def test_the_papers_values_reach_the_config():
    em = composed("method=expert_merging")
    assert (em.granularity.transform, em.granularity.init, em.optim.lr, em.optim.weight_decay) == ("sigmoid", 0.1, 0.5,
                                                                                                   1e-5)
    assert (em.optim.schedule, em.optim.t_0, em.optim.t_mult, em.trainer.gradient_clip_val) == (
        "cosine_warm_restarts", 50, 2, 1.0)
    assert (em.objective.coef_reg, em.objective.hidden_weight) == (5.0, 0.0)
    ada = composed("method=adamerging_layer")
    assert (ada.granularity.init, ada.granularity.transform, ada.optim.name) == (0.3, "clamp", "adam")
    assert ada.optim.lr == 1e-3
    assert (ada.trainer.max_steps, ada.data.batch_size, ada.trainer.accumulate_grad_batches) == (500, 16, 2)
    dam = composed("method=dam")
    assert (dam.granularity.init, dam.objective.temperature, dam.objective.lambda_sim) == ("uniform", 2.0, 0.01)
    doge = composed("method=doge")
    assert (doge.objective.rho, doge.optim.lr) == (0.07, 1e-4)
    assert composed("method=atlas").granularity.init == 0.0


def test_warm_restarts_grow_by_t_mult():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = build_schedule(opt, "cosine_warm_restarts", t_0=2, t_mult=2, eta_min=0.0)
    lrs = []
    for _ in range(7):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    restarts = [i for i, lr in enumerate(lrs) if lr == 1.0]
    assert restarts == [0, 2, 6]  # periods of 2 and then 4 steps


def test_readme_methods_table_lists_the_presets():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Methods", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"`method=(\w+)`", section))
    assert set(PRESETS) <= listed, f"not in the README's methods table: {set(PRESETS) - listed}"


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """The tiny zoo on disk, loaded once; every preset run reuses its pool and raw task vectors."""
    zoo = write_zoo(tmp_path_factory.mktemp("presets_zoo"))
    cfg = as_dict(composed(*zoo.cli_args(), "output_dir=null"))
    pool = build_pool(cfg["pool"])
    return zoo, pool, raw_task_vectors(pool, cfg["pool"])


@pytest.mark.parametrize("name", PRESETS)
def test_preset_runs_a_step_on_the_tiny_zoo(name, shared, tmp_path):
    zoo, pool, raw = shared
    steps = ["trainer.max_steps=2"] if name == "expert_merging_pp" else []  # stage 1 and stage 2: one step each
    preset = OmegaConf.load(ROOT / "conf" / "method" / f"{name}.yaml")
    static = ["trainer.max_steps=0"] if OmegaConf.select(preset, "trainer.max_steps") == 0 else []
    static += ["search.max_evals=2"] if OmegaConf.select(preset, "search") is not None else []  # one generation
    cfg = as_dict(composed(*zoo.cli_args(), f"method={name}", *SHORT, *steps, *static))
    task_vectors = prepare_task_vectors(raw, cfg["pool"], int(cfg["seed"]))
    result = run(OmegaConf.create(cfg), tmp_path, pool, task_vectors)
    assert result.coefficients and all(torch.isfinite(c).all() for c in result.coefficients.values())
    if name == "expert_merging_pp":  # budget = 4 x the number of merged tensors, with no tensor count given
        counts = json.loads((tmp_path / "chunk_allocation.json").read_text())["counts"]
        assert sum(counts.values()) == 4 * len(raw.infos)
