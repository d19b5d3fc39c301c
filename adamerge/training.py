"""The one training loop: a LightningModule whose only trainable tensors are merge coefficients.

Everything a Lightning user expects (precision, accumulation, clipping, DDP, checkpoints and
resume, progress bar, loggers) comes from the ``Trainer``; this module only computes the loss.
Checkpoints hold the trainable tensors alone, never the frozen base or the task vectors.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from contextlib import nullcontext
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import Logger
from pytorch_lightning.utilities.exceptions import SIGTERMException

from adamerge.checkpointing import AtomicCheckpointIO, Interrupted, checkpoint_callbacks
from adamerge.datamodule import DataFree
from adamerge.errors import AdamergeError
from adamerge.frank_wolfe import FrankWolfe
from adamerge.masks import param_groups
from adamerge.merged import MergedModel
from adamerge.objectives.base import Objective
from adamerge.progress import StepProgressBar
from adamerge.resume import check_resume_fits, read_resume
from adamerge.sharding import check_shard, rank_mesh
from adamerge.signals import Stopped, lightning_handles_sigterm
from adamerge.terminal import quiet_loggers

log = logging.getLogger(__name__)


class NonFiniteLoss(AdamergeError):
    """The loss became NaN/Inf; the last finite coefficients are kept."""


def build_optimizer(params, name: str = "adamw", lr: float = 1e-3, betas=(0.9, 0.999), weight_decay: float = 0.0,
                    **_) -> torch.optim.Optimizer:
    if name == "frank_wolfe":  # FW-Merging: the coefficients stay in the hull of the base and the experts
        return FrankWolfe(params, lr=lr)
    optimizers = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
    if name not in optimizers:
        raise AdamergeError(f"optim.name={name!r}; choose from {sorted([*optimizers, 'frank_wolfe'])}")
    return optimizers[name](params, lr=lr, betas=tuple(betas), weight_decay=weight_decay)


def build_schedule(optimizer, schedule: str = "none", max_steps: int = 1, t_0: int = 10, t_mult: int = 1,
                   eta_min: float = 0.0, **_):
    """Per-step schedule; ``cosine_warm_restarts`` restarts after t_0, t_0 * t_mult, ... steps."""
    if schedule == "none":
        return None
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(max_steps, 1), eta_min=eta_min)
    if schedule == "cosine_warm_restarts":
        return torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=t_0, T_mult=t_mult, eta_min=eta_min)
    raise AdamergeError(f"optim.schedule={schedule!r}; choose from none, cosine, cosine_warm_restarts")


class MergeModule(pl.LightningModule):
    """Args: the merged model, its objective and the optimizer settings (``optim`` config group)."""

    def __init__(self, merged: MergedModel, objective: Objective, optim: Mapping | None = None) -> None:
        super().__init__()
        self.merged, self.objective = merged, objective
        self.extra = torch.nn.ParameterList(objective.extra_parameters())  # registered: optimized and checkpointed
        self.optim = dict(optim or {})
        self.strict_loading = False  # checkpoints hold only the trainable tensors
        if merged.shard_stacks:
            check_shard(objective, merged.recompute, offload=merged.host is not None)

    def configure_model(self) -> None:
        """``pool.shard``: Lightning calls this inside ``Trainer.fit`` once the ranks' process group exists."""
        if self.merged.shard_stacks:
            shard_across_ranks(self.merged, self.trainer.strategy)

    def on_fit_end(self) -> None:
        """Sharded stacks gathered back (into host memory) for what follows: the fold, evaluation, writing."""
        self.merged.unshard()

    def on_fit_start(self) -> None:
        """Train mode before Lightning checks for modules left in eval mode (a loaded model is in eval mode)."""
        self.train()

    def on_train_start(self) -> None:
        """The mode of the paper's loop: dropout on or off as the objective declares (``Objective.dropout``)."""
        self.merged.train(self.objective.dropout)

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        """A Concrete mask learns (relaxed) during its steps, then is hard (``masks.ConcreteMask.begin_step``)."""
        if self.merged.granularity.mask is not None:
            self.merged.granularity.mask.begin_step(self.global_step)

    def on_train_end(self) -> None:
        """Back to eval mode for what follows training: the fold check, evaluation, the next stage."""
        self.eval()
        if self.merged.granularity.mask is not None:
            self.merged.granularity.mask.finish()

    def trainable(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def training_step(self, batch: Mapping[str, Mapping[str, torch.Tensor]], batch_idx: int) -> torch.Tensor:
        total = torch.zeros((), device=self.device)
        with self.merged.merge_once():  # one merge per step, shared by every task's batch
            for task, task_batch in batch.items():
                with self.merged.task(task) if task in self.merged.experts else nullcontext():
                    loss = self.objective.task_loss(self.merged, task, task_batch)
                total = total + self.objective.task_weights.get(task, 1.0) * loss
                self.log(f"loss/{task}", loss, batch_size=len(next(iter(task_batch.values()))))
        reg = self.objective.regularizer(self.merged)
        if reg is not None:
            total = total + reg
            self.log("loss/regularizer", reg)
        if not torch.isfinite(total):
            raise NonFiniteLoss(f"the loss became {total.item()} at step {self.global_step}; the last finite "
                                "coefficients are saved in checkpoints/interrupted.ckpt")
        self.log("loss", total, prog_bar=True)
        return total

    def on_after_backward(self) -> None:
        self.objective.after_backward(self.merged)

    def on_before_optimizer_step(self, optimizer) -> None:
        """A finite loss can still have a NaN/Inf gradient (an overflow in backward): stop before the
        optimizer writes it into the coefficients. Skipped with a GradScaler (fp16), which skips such
        steps. Only the coefficients are checked (an objective's extra tensors may be model-sized)."""
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            return
        grads = {k: p.grad for k, p in self.merged.granularity.raw.items() if p.grad is not None}
        if grads and not torch.stack([torch.isfinite(g).all() for g in grads.values()]).all():
            name = next(k for k, g in grads.items() if not torch.isfinite(g).all()).replace("/", ".")
            raise NonFiniteLoss(f"the loss's gradient (coefficients of {name}) became non-finite at step "
                                f"{self.global_step}; the last finite coefficients are saved in "
                                "checkpoints/interrupted.ckpt")

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.global_step % max(self.trainer.log_every_n_steps, 1) == 0:
            coef = torch.cat([c.flatten(1) for c in self.merged.granularity.table().values()], 1)
            for k, name in enumerate(self.merged.experts):
                self.log(f"coef/{name}/mean", coef[k].mean())
                self.log(f"coef/{name}/std", coef[k].std() if coef.shape[1] > 1 else torch.zeros(()))

    def configure_optimizers(self):
        optimizer = build_optimizer(param_groups(self.trainable(), self.merged.granularity.mask), **self.optim)
        schedule = build_schedule(optimizer, max_steps=self.trainer.max_steps, **self.optim)
        if schedule is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep = self.trainable()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["adamerge"] = {"experts": list(self.merged.experts),  # checked by read_resume
                                  "granularity": type(self.merged.granularity).__name__}


def shard_across_ranks(merged: MergedModel, strategy) -> None:
    """Keep this rank's rows of every task-vector stack (``sharding.py``); one process has nothing to split."""
    if strategy.world_size == 1:
        log.info("pool.shard=true with one process: the task vectors stay whole")
        return
    if not isinstance(strategy, pl.strategies.DDPStrategy):
        raise AdamergeError(f"pool.shard=true splits the task vectors over the ranks of data-parallel training "
                            f"(trainer.strategy=ddp), not {type(strategy).__name__}")
    whole = sum(b.numel() * b.element_size() for b in merged.task_vectors.buffers())
    merged.shard(rank_mesh(strategy.root_device), strategy.root_device)
    held = sum(s.local_bytes() for s in merged.sharded.values())
    log.info("pool.shard: rank %d of %d holds %.3g of the %.3g MiB of dense task vectors", strategy.global_rank,
             strategy.world_size, held / 2**20, whole / 2**20)


def without_buffer_broadcast(strategy):
    """``trainer.strategy=ddp`` without DDP's default broadcast of every buffer from rank 0 before each forward:
    a MergedModel's buffers (the K task-vector stacks, fixed masks, heads) are frozen and equal on every rank,
    and re-sending the stacks each step would cost K times the model's size in traffic per step."""
    return pl.strategies.DDPStrategy(broadcast_buffers=False) if strategy == "ddp" else strategy


def fit(merged: MergedModel, objective: Objective, data, tokenizer, config: Mapping, run_dir: Path, max_steps: int,
        logger: Logger | None = None, resume: str | None = None) -> None:
    """One ``Trainer.fit`` of the coefficients (and the objective's extra tensors). ``resume``: a checkpoint whose
    tensors must be exactly this run's trainable ones (checked before Lightning starts, so nothing is written)."""
    objective.setup(merged, data, tokenizer)
    module = MergeModule(merged, objective, config.get("optim"))
    if resume:
        check_resume_fits(read_resume(resume, merged.experts), module.trainable())
    trainer_cfg = {**(config.get("trainer") or {}), "max_steps": max_steps}
    callbacks, plugins = [], []
    if trainer_cfg.get("enable_checkpointing", True):
        every = int((config.get("checkpoint") or {}).get("every_n_steps", 50))
        callbacks, plugins = checkpoint_callbacks(run_dir, every), [AtomicCheckpointIO()]
    if trainer_cfg.get("enable_progress_bar", True):
        callbacks.append(StepProgressBar())
    if not config.get("verbose"):
        quiet_loggers()  # Lightning's own, set to info when it was imported (a static run never imports it)
    trainer_cfg["strategy"] = without_buffer_broadcast(trainer_cfg.get("strategy", "auto"))
    trainer = pl.Trainer(default_root_dir=str(run_dir), logger=logger or False, callbacks=callbacks, plugins=plugins,
                         **trainer_cfg)
    with lightning_handles_sigterm():
        try:
            trainer.fit(module, datamodule=data or DataFree(max_steps), ckpt_path=resume)
        except SIGTERMException as e:  # ours (``Interrupted``: SIGINT/SIGTERM after a step) or Lightning's own
            if isinstance(e, Interrupted):
                raise Stopped(e.code, str(e)) from e
            checkpoint = run_dir / "checkpoints" / "interrupted.ckpt"
            raise Stopped(143, f"stopped by SIGTERM; resume with resume={checkpoint}") from e
    objective.finish(merged)
