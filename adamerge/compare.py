"""Method comparisons: one results table (rows = methods, columns = tasks + average + time).

``compare.methods`` lists methods as Hydra overrides on top of the job's own config; the pool and
its task vectors are built once and shared by every method. The table also has the base and the
experts (each on its own task), and is printed, and written as ``results.md`` / ``results.json``.

Each average carries its 95% interval, so that a reader can tell a difference from noise: the
normal approximation over the test items, ``avg +- 1.96 * sqrt(sum_k q_k (1 - q_k) / n_k) / K`` for
K tasks with n_k items each (items of one task are independent draws; tasks are independent). The
variance uses Agresti and Coull's adjusted proportion ``q_k = (hits_k + 2) / (n_k + 4)`` rather than
the score itself, so that a perfect (or zero) score still carries its uncertainty instead of ``± 0``.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from adamerge.checks import check_before_loading
from adamerge.evaluate import evaluate_merged, evaluate_model, normalized_accuracy
from adamerge.granularity import Task
from adamerge.loading import (
    as_dict,
    build_pool,
    build_tokenizer,
    is_causal,
    load_test_sets,
    prepare_task_vectors,
    raw_task_vectors,
)
from adamerge.merged import MergedModel
from adamerge.run import run

log = logging.getLogger(__name__)


def compose_method(overrides: Sequence[str]) -> DictConfig:
    """The job's config with a method's overrides applied by Hydra (group switches included)."""
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig

    job = [o for o in HydraConfig.get().overrides.task]
    return compose(config_name="config", overrides=[*job, *overrides])


def base_and_expert_rows(pool, task_vectors, tokenizer, eval_cfg: Mapping, causal: bool) -> dict[str, dict]:
    """The base (with each task's head, if any) and each expert on its own task, both through a
    merged model (zero coefficients; teacher mode), so no model is loaded again."""
    merged = MergedModel(pool.base, task_vectors, Task(init=0.0))
    start = time.perf_counter()
    base = evaluate_merged(merged, tokenizer, eval_cfg, causal)
    rows = {"base": {**base, "time (s)": time.perf_counter() - start}}

    def expert_model(task: str):
        with merged.as_expert(task):
            return merged.fold(task) if len(merged.heads) else merged.fold()

    start = time.perf_counter()
    experts = {t: evaluate_model(expert_model, tokenizer, {**eval_cfg, "tests": {t: eval_cfg["tests"][t]}}, causal)[t]
               for t in merged.experts}
    experts["avg"] = sum(experts.values()) / len(experts)
    rows["experts (each on its task)"] = {**experts, "time (s)": time.perf_counter() - start}
    return rows


Z95 = 1.959964
"""Two-sided 95% quantile of the standard normal."""
HALF_WIDTH = "avg 95% +-"
"""A row's key for the half-width of its average's 95% interval (a fraction, like the scores)."""


def item_counts(eval_cfg: Mapping, causal: bool) -> dict[str, int]:
    """Items per test task, read as evaluation reads them (``eval.limit`` included)."""
    return {t: len(rows) for t, rows in load_test_sets(eval_cfg, causal).items()}


def average_half_width(scores: Mapping[str, float], sizes: Mapping[str, int]) -> float:
    """Half-width of the 95% normal-approximation interval of the unweighted mean of per-task accuracies
    (variance from Agresti-Coull adjusted proportions, see the module docstring)."""
    adjusted = {t: (scores[t] * n + 2) / (n + 4) for t, n in sizes.items()}
    variance = sum(adjusted[t] * (1 - adjusted[t]) / n for t, n in sizes.items()) / len(sizes) ** 2
    return Z95 * math.sqrt(variance)


def format_table(rows: Mapping[str, Mapping[str, float]], tasks: Sequence[str]) -> str:
    columns = [*tasks, "avg", "norm. avg", "time (s)"]
    lines = ["| method | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, row in rows.items():
        cells = [_cell(row, c) for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(row: Mapping[str, float], column: str) -> str:
    value = row.get(column)
    if value is None:
        return ""
    if column == "time (s)":
        return f"{value:.1f}"
    if column == "avg" and row.get(HALF_WIDTH) is not None:
        return f"{100 * value:.1f} ± {100 * row[HALF_WIDTH]:.1f}"
    return f"{100 * value:.1f}"


def interval_note(sizes: Mapping[str, int]) -> str:
    """The line under a table that says what its ± means and how noisy one task's score is."""
    low, high = min(sizes.values()), max(sizes.values())
    counts = f"{low}" if low == high else f"{low}-{high}"
    return (f"avg ± : 95% interval (normal approximation, Agresti-Coull) over {counts} test items per task; "
            f"one task's score alone is within ±{100 * Z95 * math.sqrt(0.25 / low):.1f} points (at 50%).")


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def method_row(method: Mapping, pool, raw, run_dir: Path, compose=compose_method) -> dict[str, float]:
    """One method's row: its config composed on the job's, run on the shared pool and raw task vectors."""
    method_cfg = as_dict(compose(method["overrides"]))
    method_cfg["output_dir"] = None
    # each method is its own logger run, named after it and grouped with the others of this table
    method_cfg["logger"] = {**method_cfg["logger"], "run_name": method["name"], "group": "/".join(run_dir.parts[-2:])}
    tv = prepare_task_vectors(raw, method_cfg["pool"], int(method_cfg.get("seed", 0)))
    log.info("method %s: %s", method["name"], " ".join(method["overrides"]))
    result = run(OmegaConf.create(method_cfg), run_dir / slug(method["name"]), pool, tv)
    return {**result.metrics["after"], "time (s)": result.seconds}


def compare(cfg: DictConfig, run_dir: Path, compose=compose_method) -> dict[str, dict[str, float]]:
    """Evaluate base, experts and every method of ``cfg.compare.methods``; return the table rows."""
    config = as_dict(cfg)
    eval_cfg = config["eval"]
    check_before_loading({**config, "output_dir": None}, run_dir)  # bad input costs no model load
    pool = build_pool(config["pool"])
    raw = raw_task_vectors(pool, config["pool"])
    tokenizer = build_tokenizer(pool, bool(config["pool"].get("trust_remote_code")))
    causal = is_causal(pool)
    tasks = list(raw.experts)

    rows = base_and_expert_rows(pool, raw, tokenizer, eval_cfg, causal)
    experts = rows["experts (each on its task)"]
    for method in config["compare"]["methods"]:
        rows[method["name"]] = method_row(method, pool, raw, run_dir, compose)
    sizes = item_counts(eval_cfg, causal)
    for row in rows.values():
        row["norm. avg"] = normalized_accuracy({t: row[t] for t in tasks}, {t: experts[t] for t in tasks})["avg"]
        row[HALF_WIDTH] = average_half_width(row, sizes)
    table = f"{format_table(rows, tasks)}\n\n{interval_note(sizes)}"
    print(table)
    (run_dir / "results.md").write_text(table + "\n")
    (run_dir / "results.json").write_text(json.dumps(rows, indent=2))
    return rows
