"""What a run trains, built from its inputs: the calibration data module and the merged model (after
Expert Merging++'s layer-wise stage and chunk allocation when ``granularity.budget`` is set)."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from adamerge.allocation import allocate_chunks, tensor_importance
from adamerge.data import Collator
from adamerge.errors import AdamergeError
from adamerge.granularity import GRANULARITIES, Layer, chunk_limit
from adamerge.merged import MergedModel
from adamerge.objectives.base import Objective
from adamerge.options import construct
from adamerge.pool import ExpertPool
from adamerge.sensitivity import apply_sens_init
from adamerge.taskvectors import TaskVectors

if TYPE_CHECKING:
    from pytorch_lightning.loggers import Logger

    from adamerge.datamodule import TaskDataModule

log = logging.getLogger(__name__)


def max_positions(model: torch.nn.Module) -> int | None:
    """The longest input the model's position embeddings allow (None: no such limit, e.g. rotary)."""
    config = getattr(model, "config", None)
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def warn_long_rows(rows: Mapping[str, Sequence[Mapping]], tokenizer, field: str, max_length: int) -> None:
    """Say how many rows are longer than ``max_length`` tokens: they are cut from the left (the end, which
    the scored positions read, is kept)."""
    for task, task_rows in rows.items():
        if not isinstance(task_rows, list) or not callable(tokenizer):
            continue  # a lazy dataset (images, hub splits): not tokenized up front
        long = sum(len(tokenizer(r[field])["input_ids"]) > max_length for r in task_rows)
        if long:
            log.warning("task %r: %d of %d calibration rows are longer than %d tokens; their start is cut "
                        "(left truncation)", task, long, len(task_rows), max_length)


def build_datamodule(cfg: Mapping, rows: Mapping[str, Sequence[Mapping]] | None, tokenizer, objective: Objective,
                     causal: bool, seed: int, positions: int | None = None,
                     model_bos_id: int | None = None) -> TaskDataModule | None:
    """The calibration rows as Lightning serves them (None without rows: a run without data imports no Lightning)."""
    if rows is None:
        return None
    from adamerge.datamodule import TaskDataModule

    labeled = objective.needs_labels
    max_length = min(cfg.get("max_length", 512), positions or cfg.get("max_length", 512))
    warn_long_rows(rows, tokenizer, cfg.get("field", "prompt"), max_length)
    collator = Collator(tokenizer, field=cfg.get("field", "prompt"), causal=causal, max_length=max_length,
                        answer_field=cfg.get("answer_field", "answer") if labeled and causal else None,
                        label_field=cfg.get("label_field", "label") if labeled and not causal else None,
                        add_bos=cfg.get("add_bos", "auto"), chat_template=bool(cfg.get("chat_template")),
                        model_bos_id=model_bos_id)
    return TaskDataModule(rows, collator, batch_size=cfg.get("batch_size", 8), shuffle=cfg.get("shuffle", True),
                          seed=seed)


def build_merged(pool: ExpertPool, task_vectors: TaskVectors, config: Mapping, objective: Objective, data, tokenizer,
                 run_dir: Path, max_steps: int, logger: Logger | None = None) -> tuple[MergedModel, int]:
    """The MergedModel to train; with ``granularity.budget`` (chunk), after Expert Merging++'s stage 1; with
    ``granularity.init=sens``, at Sens-Merging's coefficients (computed here from ``data``).

    Returns the model and the number of steps left for the main fit.
    """
    gran_cfg = dict(config["granularity"])
    budget, stage1_steps = gran_cfg.pop("budget", None), gran_cfg.pop("stage1_steps", None)
    per_tensor = gran_cfg.pop("budget_per_tensor", None)
    if per_tensor and not budget:  # a budget that needs no knowledge of the model: a multiple of its tensor count
        budget = round(float(per_tensor) * len(task_vectors.infos))
    if not budget:
        granularity = construct(GRANULARITIES, "granularity", gran_cfg)
        merged = MergedModel(pool.base, task_vectors, granularity, bool(config.get("recompute")), shard(config))
        if granularity.init == "sens":  # Sens-Merging's coefficients, from the calibration data
            apply_sens_init(merged, data)
        return merged, max_steps
    if gran_cfg.get("name") != "chunk":
        raise AdamergeError("granularity.budget (Expert Merging++ allocation) needs granularity=chunk")
    steps1 = int(stage1_steps or max_steps // 2)
    counts, table = chunk_allocation_stage(pool, task_vectors, {**gran_cfg, "budget": budget}, objective, data,
                                           tokenizer, config, run_dir, steps1, logger)
    chunk = construct(GRANULARITIES, "granularity", {**gran_cfg, "counts": counts})
    merged = MergedModel(pool.base, task_vectors, chunk, bool(config.get("recompute")), shard(config))
    chunk.load_table(table)
    return merged, max_steps - steps1


def shard(config: Mapping) -> bool:
    """``pool.shard``: each rank of a data-parallel run keeps 1/N of every task-vector stack (``sharding.py``)."""
    return bool((config.get("pool") or {}).get("shard"))


def chunk_allocation_stage(pool: ExpertPool, task_vectors: TaskVectors, gran_cfg: dict, objective: Objective, data,
                           tokenizer, config: Mapping, run_dir: Path, steps: int, logger: Logger | None = None):
    """Expert Merging++ stage 1: train layer-wise, then allocate the chunk budget by importance."""
    from adamerge.training import fit  # the trainer (Lightning) is imported by the runs that train

    common = {k: gran_cfg[k] for k in ("init", "transform", "space") if k in gran_cfg}
    stage1 = MergedModel(pool.base, task_vectors, Layer(**common), bool(config.get("recompute")), shard(config))
    fit(stage1, objective, data, tokenizer, config, run_dir / "stage1", steps, logger)
    table = stage1.granularity.table()
    importance = tensor_importance(table, task_vectors.sq_norms(), task_vectors.infos)
    limits = {n: chunk_limit(i, gran_cfg.get("chunking", "flat")) for n, i in task_vectors.infos.items()}
    counts = allocate_chunks(importance, int(gran_cfg["budget"]), limits)
    log.info("Expert Merging++ chunk allocation (budget %s): %s", gran_cfg["budget"], counts)
    (run_dir / "chunk_allocation.json").write_text(json.dumps({"importance": importance, "counts": counts}, indent=2))
    return counts, table
