"""Experiment loggers (``logger=csv|tensorboard|wandb|none``): one logger per run, from start to fold.

A run's logger gets the resolved config as hyperparameters before training, Lightning's losses and
coefficient statistics during it, and afterwards the test metrics before and after training
(``test/before/TASK``, ``test/after/TASK``, lm-eval's ``harness/MODEL/TASK/METRIC``) and the coefficient
heatmap (TensorBoard, W&B). A static merge (``trainer.max_steps=0``) logs the same, without losses; its CSV
log is written without Lightning (``StaticCSVLogger``: the same files), so that a static merge never imports it.
In a method comparison each method is its own run: ``logger.run_name`` names it, ``logger.group`` groups them (W&B).
"""

from __future__ import annotations

import csv
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import OmegaConf
from omegaconf.errors import UnsupportedValueType, ValidationError

from adamerge.errors import AdamergeError
from adamerge.harness import flat_scores
from adamerge.ranks import is_rank_zero

if TYPE_CHECKING:
    from pytorch_lightning.loggers import Logger

log = logging.getLogger(__name__)

LOGGERS = ("csv", "tensorboard", "wandb", "none")


class StaticCSVLogger:
    """``logger=csv`` for a run that does not train: the files Lightning's ``CSVLogger`` writes
    (``logs/version_N/hparams.yaml``; ``metrics.csv``, its columns sorted, ``step`` among them), without Lightning."""

    def __init__(self, save_dir: Path) -> None:
        root = Path(save_dir) / "logs"
        versions = [int(p.name[len("version_"):]) for p in root.glob("version_*")
                    if p.is_dir() and p.name[len("version_"):].isdigit()]
        self.log_dir = root / f"version_{max(versions, default=-1) + 1}"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict[str, Any]] = []

    def log_hyperparams(self, params: Mapping[str, Any]) -> None:
        """As YAML; a value YAML cannot hold (an in-memory model given to the Python API) is skipped, as Lightning
        skips it."""
        kept = {}
        for key, value in params.items():
            try:
                kept[key] = OmegaConf.create({key: value})[key]
            except (UnsupportedValueType, ValidationError):
                log.warning("hparams.yaml: %r skipped (not YAML)", key)
        OmegaConf.save(OmegaConf.create(kept), self.log_dir / "hparams.yaml")

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self.rows.append({**metrics, "step": step})

    def save(self) -> None:
        if not self.rows:
            return
        with open(self.log_dir / "metrics.csv", "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=sorted(set().union(*self.rows)))
            writer.writeheader()
            writer.writerows(self.rows)


def build_logger(cfg: Mapping | None, save_dir: Path, config: Mapping, trains: bool = True
                 ) -> Logger | StaticCSVLogger | None:
    """The run's logger (None for ``logger=none``), with ``config`` logged as its hyperparameters; a run that does
    not train (``trains=False``) logs CSV without Lightning."""
    cfg = dict(cfg or {})
    name = cfg.get("name", "none")
    if name == "none":
        return None
    if name not in LOGGERS:
        raise AdamergeError(f"logger={name!r}; choose from {', '.join(LOGGERS)}")
    if name == "csv" and not trains:
        logger = StaticCSVLogger(save_dir)
        logger.log_hyperparams(dict(config))
        return logger
    from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger, WandbLogger

    if name == "csv":
        logger = CSVLogger(save_dir=str(save_dir), name="logs")
    elif name == "tensorboard":
        logger = TensorBoardLogger(save_dir=str(save_dir), name="logs", default_hp_metric=False)
    elif name == "wandb":
        mode = cfg.get("mode") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        logger = WandbLogger(project=cfg.get("project", "adamerge"), entity=cfg.get("entity"),
                             name=cfg.get("run_name"), group=cfg.get("group"), save_dir=str(save_dir),
                             offline=mode == "offline")
        # Lightning always passes ``anonymous``, which this W&B only answers with a deprecation warning
        logger._wandb_init.pop("anonymous", None)
    logger.log_hyperparams(dict(config))
    return logger


def test_metrics(metrics: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """``{"before": {task: score}, "after": ...}`` -> ``{"test/before/TASK": score, ...}``; lm-eval harness scores
    (``metrics["harness"][model][task][metric]``) as ``harness/MODEL/TASK/METRIC``."""
    scores = {f"test/{when}/{task}": float(score) for when, row in metrics.items() if when != "harness"
              for task, score in row.items()}
    return {**scores, **{f"harness/{k}": v for k, v in flat_scores(metrics.get("harness") or {}).items()}}


def log_heatmap(logger: Logger, merged, step: int) -> None:
    """The coefficient heatmap as an image: TensorBoard's and W&B's (CSV logs numbers only)."""
    from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger

    if not isinstance(logger, TensorBoardLogger | WandbLogger):
        return
    import matplotlib.pyplot as plt

    from adamerge.plots import coefficient_heatmap

    fig = coefficient_heatmap(merged.granularity.table(), merged.experts)
    if isinstance(logger, TensorBoardLogger):
        logger.experiment.add_figure("coefficients/heatmap", fig, global_step=step)
    else:
        import wandb

        logger.experiment.log({"coefficients/heatmap": wandb.Image(fig), "trainer/global_step": step})
    plt.close(fig)


def finish_logger(logger: Logger | StaticCSVLogger | None, metrics: Mapping[str, Mapping[str, float]], merged,
                  step: int) -> None:
    """Log the test metrics and the heatmap, then close the run (the next method opens its own)."""
    if logger is None or not is_rank_zero():
        return
    scores = test_metrics(metrics)
    if isinstance(logger, StaticCSVLogger):
        if scores:
            logger.log_metrics(scores, step=step)
        logger.save()
        return
    from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger  # a logger of Lightning's: it is imported

    if isinstance(logger, TensorBoardLogger) and scores:  # the HParams tab: the config beside its results
        logger.log_hyperparams(logger.hparams, metrics=scores, step=step)
    elif scores:
        logger.log_metrics(scores, step=step)
    log_heatmap(logger, merged, step)
    logger.save()
    logger.finalize("success")
    if isinstance(logger, WandbLogger):
        logger.experiment.finish()


def close_failed_run() -> None:
    """A job that failed mid-run leaves its W&B run open; the next job of a sweep (same process) would
    otherwise log into it. Marks it failed and closes it."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish(exit_code=1)
