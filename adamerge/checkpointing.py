"""Checkpoints that survive a crash: periodic ``last.ckpt``, one on any exception, written atomically."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.callbacks import ModelCheckpoint, OnExceptionCheckpoint
from pytorch_lightning.plugins.io import TorchCheckpointIO


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


def checkpoint_callbacks(run_dir: Path, every_n_steps: int) -> list:
    """``checkpoints/last.ckpt`` every n steps and ``checkpoints/interrupted.ckpt`` on SIGINT/SIGTERM/NaN."""
    dirpath = run_dir / "checkpoints"
    return [
        ModelCheckpoint(dirpath=dirpath, filename="last", every_n_train_steps=every_n_steps, save_top_k=1,
                        enable_version_counter=False),
        OnExceptionCheckpoint(dirpath=dirpath, filename="interrupted"),
    ]
