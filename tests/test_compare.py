"""The method table behind ``+experiment=quickstart``: one pool, several methods, one table.

Runs ``adamerge.compare.compare`` on the shipped zoo with the quickstart config and a shorter method
list, on a slice of the test sets; checks that a static merge row equals a direct evaluation of the
same merge, that every method of the real quickstart composes, that the intervals are the normal
approximation, and that the README's quickstart table is what the shipped zoo gives (to the digit).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import open_dict

from adamerge.compare import average_half_width, compare, format_table, method_row
from adamerge.evaluate import evaluate_merged
from adamerge.granularity import Task
from adamerge.loading import as_dict, build_pool, build_task_vectors, build_tokenizer, raw_task_vectors
from adamerge.merged import MergedModel
from adamerge.resolvers import register_resolvers
from adamerge.zoo import EXPERT_TASKS
from adamerge.zoo.build import SHIPPED

README = Path(__file__).resolve().parents[1] / "README.md"

METHODS = [
    {"name": "task arithmetic (0.3)", "overrides": ["method=task_arithmetic"]},
    {"name": "TIES", "overrides": ["method=ties"]},
    {"name": "AdaMerging task-wise", "overrides": ["method=adamerging_task", "trainer.max_steps=2",
                                                   "trainer.accumulate_grad_batches=1"]},
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


def test_average_interval_is_the_normal_approximation_with_adjusted_proportions():
    sizes = {"a": 496, "b": 96}
    half = average_half_width({"a": 0.5, "b": 0.875}, sizes)  # adjusted: 250/500 and 86/100
    assert half == pytest.approx(1.959964 * math.sqrt(0.25 / 496 + 0.86 * 0.14 / 96) / 2)
    perfect = average_half_width({"a": 1.0, "b": 1.0}, sizes)
    assert 0 < perfect < half  # a perfect score is not certain
    row = {"a": 0.5, "b": 0.875, "avg": 0.6875, "avg 95% +-": half, "time (s)": 1.25}
    assert format_table({"m": row}, ["a", "b"]).splitlines()[-1] == "| m | 50.0 | 87.5 | 68.8 ± 4.1 |  | 1.2 |"


def table_rows(text: str) -> dict[str, list[str]]:
    """``{method: cells}`` of the first markdown table in ``text``."""
    lines = re.search(r"(^\|.*\|$\n?)+", text, re.MULTILINE).group(0).splitlines()
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])}


def test_readme_quickstart_cells_are_what_the_shipped_zoo_gives(tmp_path, monkeypatch):
    """The README's base and task arithmetic cells of the cheapest task (``count``: one-digit answers),
    recomputed from the shipped zoo through ``method_row``, to the digit; catches a zoo, a merge or an
    evaluation that no longer gives the README's table."""
    monkeypatch.delenv("ADAMERGE_ZOO", raising=False)
    register_resolvers()
    job = ["+experiment=quickstart", "output_dir=null"]
    with initialize_config_module("adamerge.conf", version_base=None):
        cfg = compose("config", overrides=job)
        assert cfg.pool.base == str(SHIPPED / "base")
        method = next(m for m in cfg.compare.methods if m.name.startswith("task arithmetic"))

        def count_only(overrides):
            method_cfg = compose("config", overrides=[*job, *overrides])
            with open_dict(method_cfg):
                method_cfg.eval.tests = {"count": method_cfg.eval.tests["count"]}
            return method_cfg

        config = as_dict(count_only([]))
        pool = build_pool(config["pool"])
        raw = raw_task_vectors(pool, config["pool"])
        merged_row = method_row(method, pool, raw, tmp_path, compose=count_only)
    base_row = evaluate_merged(MergedModel(pool.base, raw, Task(init=0.0)), build_tokenizer(pool), config["eval"],
                               causal=True)
    readme = README.read_text().split("## Results", 1)[1]
    column = re.search(r"^\| method \|.*$", readme, re.MULTILINE).group(0).split("|")[2:-1]
    count = [c.strip() for c in column].index("count")
    rows = table_rows(readme)
    assert f"{100 * base_row['count']:.1f}" == rows["base"][count]
    assert f"{100 * merged_row['count']:.1f}" == rows[method.name][count]
