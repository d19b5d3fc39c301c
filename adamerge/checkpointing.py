"""Checkpoints that survive a crash: periodic ``last.ckpt``, one on any exception, written atomically.

SIGINT and SIGTERM stop training at the end of the step in progress (``StopOnSignal``), so that
``interrupted.ckpt`` holds a finished step and resumes like ``last.ckpt`` does.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.plugins.io import TorchCheckpointIO
from pytorch_lightning.utilities.exceptions import SIGTERMException


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to a temporary file beside the target, fsync, then rename: a kill leaves the old file or the new one."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


class SaveOnException(pl.Callback):
    """Write ``path`` when training stops on an exception (NaN loss, SIGINT/SIGTERM, a crash).

    Lightning's ``OnExceptionCheckpoint`` does this too, but its presence turns ``fit(ckpt_path=None)``
    into ``"last"``: a new run in the same run dir would silently resume from a stale interrupted.ckpt.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        trainer.save_checkpoint(self.path)


class Interrupted(SIGTERMException):
    """SIGINT or SIGTERM stopped training after a finished step; ``checkpoint`` resumes it.

    A ``SIGTERMException`` (a ``SystemExit``): Lightning saves ``interrupted.ckpt`` on it and re-raises.
    """

    def __init__(self, signum: int, step: int, checkpoint: Path) -> None:
        super().__init__(128 + signum)
        self.signum, self.step, self.checkpoint = signum, step, checkpoint

    def __str__(self) -> str:
        return (f"stopped by {signal.Signals(self.signum).name} after step {self.step}; resume with "
                f"resume={self.checkpoint}")


class StopOnSignal(pl.Callback):
    """Stop at the end of the step in progress on SIGINT or SIGTERM, raising ``Interrupted``.

    Lightning alone turns SIGINT into a ``KeyboardInterrupt`` wherever it lands (mid-step, even
    mid-optimizer-step) and exits 1; SIGTERM it handles after the step in recent versions, at the
    end of the epoch in older ones. A second SIGINT interrupts at once.
    """

    def __init__(self, checkpoint: Path) -> None:
        self.checkpoint, self.received, self._installed, self._previous = checkpoint, None, False, None

    def _on_sigint(self, signum, frame) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.received = None
        main = threading.current_thread() is threading.main_thread()
        if main and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # a SIGINT ignored stays ignored
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
            self._installed = True

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        signum = self.received or (signal.SIGTERM if trainer.received_sigterm else None)
        # every rank stops at the same step (one tiny all-reduce; a no-op in a single process)
        if trainer.strategy.reduce_boolean_decision(signum is not None, all=False):
            raise Interrupted(signum or signal.SIGTERM, trainer.global_step, self.checkpoint)

    def _restore(self, *args: Any, **kwargs: Any) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, signal.SIG_DFL if self._previous is None else self._previous)
            self._installed, self._previous = False, None

    on_train_end = on_exception = teardown = _restore


def checkpoint_callbacks(run_dir: Path, every_n_steps: int) -> list:
    """``checkpoints/last.ckpt`` every n steps and ``checkpoints/interrupted.ckpt`` on SIGINT/SIGTERM/NaN."""
    dirpath = run_dir / "checkpoints"
    return [
        ModelCheckpoint(dirpath=dirpath, filename="last", every_n_train_steps=every_n_steps, save_top_k=1,
                        enable_version_counter=False),
        SaveOnException(dirpath / "interrupted.ckpt"),
        StopOnSignal(dirpath / "interrupted.ckpt"),
    ]
