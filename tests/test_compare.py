"""The method table behind ``+experiment=quickstart``: one pool, several methods, one table.

Runs ``adamerge.compare.compare`` on the embedded zoo (built or reused, shared with the notebook
test) with the quickstart config and a shorter method list, on a slice of the test sets; checks
that a static merge row equals a direct evaluation of the same merge, and that every method of the
real quickstart composes.
"""

from __future__ import annotations

import json

import pytest
from hydra import compose, initialize_config_module
from omegaconf import open_dict

from adamerge.compare import compare
from adamerge.granularity import Task
from adamerge.merged import MergedModel
from adamerge.resolvers import register_resolvers
from adamerge.run import as_dict, build_pool, build_task_vectors, build_tokenizer, evaluate_merged
from adamerge.zoo import EXPERT_TASKS

METHODS = [
    {"name": "task arithmetic (0.3)", "overrides": ["granularity=task", "granularity.init=0.3", "trainer.max_steps=0"]},
    {"name": "TIES", "overrides": ["granularity=task", "granularity.init=1.0", "pool.preprocess.method=ties",
                                   "trainer.max_steps=0"]},
    {"name": "AdaMerging task-wise", "overrides": ["granularity=task", "objective=entropy", "trainer.max_steps=2"]},
]


def composed(extra: list[str]):
    job = ["+experiment=quickstart", "eval.limit=24", "output_dir=null", *extra]
    cfg = compose("config", overrides=job)
    with open_dict(cfg):
        cfg.compare = {"methods": METHODS}
    return cfg, lambda overrides: compose("config", overrides=[*job, *overrides])


def test_every_quickstart_method_composes():
    with initialize_config_module("adamerge.conf", version_base=None):
        methods = compose("config", overrides=["+experiment=quickstart"]).compare.methods
        for method in methods:
            compose("config", overrides=["+experiment=quickstart", *method.overrides])
    assert len(methods) >= 6


@pytest.mark.parametrize("offload", [False, True])
def test_compare_prints_one_table_with_every_method(tmp_path, capsys, offload):
    register_resolvers()
    with initialize_config_module("adamerge.conf", version_base=None):
        cfg, compose_method = composed(["pool.offload=cpu"] if offload else [])
        rows = compare(cfg, tmp_path, compose=compose_method)
    names = ["base", "experts (each on its task)", *(m["name"] for m in METHODS)]
    assert list(rows) == names
    table = capsys.readouterr().out
    assert all(name in table for name in names) and "norm. avg" in table
    assert json.loads((tmp_path / "results.json").read_text()) == rows
    for row in rows.values():
        assert set(row) >= {*EXPERT_TASKS, "avg", "norm. avg", "time (s)"}
        assert all(0.0 <= row[t] <= 1.0 for t in EXPERT_TASKS)

    config = as_dict(cfg)  # the static row equals a direct evaluation of the same merge
    pool = build_pool(config["pool"])
    merged = MergedModel(pool.base, build_task_vectors(pool, config["pool"]), Task(init=0.3))
    direct = evaluate_merged(merged, build_tokenizer(pool), config["eval"], causal=True)
    assert {t: rows["task arithmetic (0.3)"][t] for t in EXPERT_TASKS} == {t: direct[t] for t in EXPERT_TASKS}
