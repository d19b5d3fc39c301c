"""One merge run from a resolved config: checks -> pool and task vectors -> merged model -> trainer -> fold -> write.

``python -m adamerge`` (Hydra) and the Python API both end up in ``run``; each step lives in its own module,
the data flowing one way: ``checks`` (before any model), ``loading`` (the inputs), ``building`` (the data module,
the merged model), ``training`` (``fit``), ``evaluate`` (scores before and after), ``writing`` (``output_dir``).
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from adamerge.building import build_datamodule, build_merged, max_positions
from adamerge.checks import check_before_loading, protected_inputs
from adamerge.closed_form import closed_form_merge
from adamerge.evaluate import evaluate_merged, fold_difference, task_vectors_and_references
from adamerge.loading import as_dict, build_pool, build_tokenizer, is_causal
from adamerge.loggers import build_logger, finish_logger
from adamerge.lora_output import check_adapter_fits, output_options
from adamerge.plan import plan_line
from adamerge.pool import ExpertPool
from adamerge.publish import hub_options, publish
from adamerge.ranks import is_rank_zero
from adamerge.search import run_search
from adamerge.taskvectors import TaskVectors
from adamerge.writing import RunResult, write_output

log = logging.getLogger(__name__)


def run(cfg: DictConfig | Mapping, run_dir: str | Path = ".", pool: ExpertPool | None = None,
        task_vectors: TaskVectors | None = None) -> RunResult:
    """Train (unless ``trainer.max_steps=0``), fold and write ``output_dir`` (``None``: nothing is written);
    returns the metrics. Everything that can be checked without a model is checked first.

    ``pool`` / ``task_vectors`` may be passed in to share them between runs (method comparisons).
    """
    start = time.perf_counter()
    config = as_dict(cfg)
    run_dir = Path(run_dir)
    checked = check_before_loading(config, run_dir, pool)
    log.info("%s", plan_line(config, checked.rows, pool.base if pool is not None else None))
    objective, seed, output_dir = checked.objective, int(config.get("seed", 0)), config.get("output_dir")
    seed_everything(seed)
    pool = pool or build_pool(config["pool"])
    tokenizer = build_tokenizer(pool, bool(config["pool"].get("trust_remote_code")))
    harness = checked.harness
    scores = {}  # lm-eval harness: model -> task -> metric -> value
    if task_vectors is None:  # built here: the base and the experts are scored here, once
        task_vectors, scores = task_vectors_and_references(pool, config["pool"], seed, harness, tokenizer)
    causal = is_causal(pool)
    data = build_datamodule(config.get("data") or {}, checked.rows, tokenizer, objective, causal, seed,
                            max_positions(pool.base), getattr(getattr(pool.base, "config", None), "bos_token_id", None))
    task_vectors = closed_form_merge(task_vectors, pool.base, config, data, tokenizer)  # (closed_form.method)
    max_steps = int((config.get("trainer") or {}).get("max_steps", 0))
    logger = build_logger(config.get("logger"), run_dir, config, trains=max_steps > 0)
    merged, steps_left = build_merged(pool, task_vectors, config, objective, data, tokenizer, run_dir, max_steps,
                                      logger)
    fmt, rank = output_options(config)
    if output_dir and fmt != "full":  # an adapter that cannot be written is refused before training
        check_adapter_fits(merged, pool, rank)
    eval_cfg = config.get("eval") or {}
    metrics = {"before": evaluate_merged(merged, tokenizer, eval_cfg, causal)}
    if harness:  # the merge is scored with the tokenizer output_dir gets (experts' added tokens included)
        merged_tokenizer = pool.vocabulary.merged_tokenizer() or tokenizer
        scores["before"] = harness.evaluate(merged.fold(), merged_tokenizer)
    if checked.search is not None:  # gradient-free: CMA-ES over the same coefficients, in place of training
        run_search(merged, checked.search, config, objective=objective, data=data, tokenizer=tokenizer,
                   causal=causal, dev=checked.dev, harness=harness,
                   harness_tokenizer=merged_tokenizer if harness else None, logger=logger)
    elif steps_left != 0:
        from adamerge.training import fit  # the trainer (Lightning): imported by the runs that train

        fit(merged, objective, data, tokenizer, config, run_dir, steps_left, logger, config.get("resume"))

    # The fold, once: evaluated, checked and written (without a use for a model it is written tensor by tensor)
    changed = steps_left != 0 or checked.search is not None
    needs_model = data is not None or eval_cfg.get("tests") or (harness and changed)
    folded = merged.fold() if needs_model and not len(merged.heads) else None
    metrics["after"] = evaluate_merged(merged, tokenizer, eval_cfg, causal, folded)
    if harness:  # without training (or search) the merge is the one scored before
        scores["after"] = scores["before"] if not changed else harness.evaluate(
            folded if folded is not None else merged.fold(), merged_tokenizer)
        metrics["harness"] = scores
    finish_logger(logger, metrics, merged, max_steps)
    diff = None
    if data is not None:
        first = merged.experts[0]
        with merged.task(first):  # with per-task heads: the first task's classifier
            model = folded if folded is not None else merged.fold(first)
            diff = fold_difference(merged, model, next(iter(data.loader(first, shuffle=False))))
        log.info("fold check: max |folded - merged| logits = %.3g", diff)
    else:
        log.info("fold check skipped: no calibration data (data.paths) to run it on")
    result = RunResult(Path(output_dir) if output_dir else None, metrics, merged.granularity.table(), diff)
    result.seconds = time.perf_counter() - start
    if output_dir and is_rank_zero():  # under DDP every rank gets here; one writes
        write_output(merged, pool, objective, config, result, protected_inputs(config, {"the run directory": run_dir}),
                     folded=folded)
        hub = hub_options(config)
        if hub is not None:  # after the atomic write: a failed upload leaves the local output complete
            publish(result.output_dir, **hub)
    return result


def seed_everything(seed: int) -> None:
    """Lightning's ``seed_everything(seed, workers=True)`` without importing Lightning: Python's, NumPy's and
    torch's generators, and the variables its trainer (``PL_SEED_WORKERS``: seeded loader workers) and its DDP
    launcher (``PL_GLOBAL_SEED``) read."""
    os.environ["PL_GLOBAL_SEED"] = str(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    os.environ["PL_SEED_WORKERS"] = "1"
