"""What a run shows in the terminal: adamerge's own lines, one step bar, and the libraries' warnings only.

Lightning announces the hardware, advertises its cloud services and warns that modules are in
eval mode (the frozen base is, on purpose: dropout must stay off while coefficients are learned);
transformers draws a bar per loaded checkpoint; both emit deprecation notices meant for library
authors. ``quiet()`` keeps that chatter at warning level; ``verbose=true`` shows it all again.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

from pytorch_lightning.callbacks import TQDMProgressBar
from pytorch_lightning.callbacks.progress.tqdm_progress import Tqdm

LIBRARY_LOGGERS = ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric", "transformers",
                   "peft", "sentence_transformers", "datasets", "huggingface_hub")

# Warnings that say nothing actionable to someone merging models.
IGNORED_WARNINGS = (
    r".*module\(s\) in eval mode.*",                # the frozen base is in eval mode by design
    r"Could not find a config file in .*",          # peft, saving an adapter of a local base
    r"The number of training batches .* is smaller than the logging interval.*",
    r".*does not have many workers which may be a bottleneck.*",  # in-memory calibration batches
)


def quiet(verbose: bool = False) -> None:
    """Libraries' info lines, progress bars and deprecation notices off (unless ``verbose``)."""
    if verbose:
        return
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("WANDB_SILENT", "true")  # W&B's banner and run summary; the run directory is printed
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_warning()
    hf_logging.disable_progress_bar()  # "Loading weights: 100%|..." for every checkpoint read
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category)
    for message in IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=message)


class StepProgressBar(TQDMProgressBar):
    """One bar over the whole fit: optimizer steps out of ``max_steps``, labelled with ``description``.

    A merge trains for a number of steps, not epochs, and its loaders are short or endless, so
    Lightning's per-epoch bar restarts every few steps and shows no useful total (``Epoch 4/-2``).
    """

    def __init__(self, description: str = "training") -> None:
        super().__init__(leave=False)
        self.description = description

    def init_train_tqdm(self) -> Tqdm:
        """Lightning's training bar, made with its final label and total (a resumed run starts where it stopped)."""
        steps = self.trainer.max_steps
        return Tqdm(desc=self.description, total=steps if steps > 0 else None, initial=self.trainer.global_step,
                    position=2 * self.process_position, disable=self.is_disabled, leave=False, dynamic_ncols=True,
                    file=sys.stdout, smoothing=0, bar_format=self.BAR_FORMAT)

    def on_train_epoch_start(self, trainer, *_) -> None:
        """Keep the one bar (Lightning's resets it per epoch)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        bar = self.train_progress_bar
        if not bar.disable and self._should_update(trainer.global_step, bar.total):
            bar.n = trainer.global_step
            bar.set_postfix(self.get_metrics(trainer, pl_module))
            bar.refresh()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        """The bar lives until the fit ends, not the epoch."""

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        """A failed fit (NaN, Ctrl+C) closes its bar, so that the error is not followed by a stale one."""
        if self._train_progress_bar is not None:
            self._train_progress_bar.close()
