"""The one step bar of a fit (Lightning's TQDM bar, over optimizer steps instead of epochs)."""

from __future__ import annotations

import sys

from pytorch_lightning.callbacks import TQDMProgressBar
from pytorch_lightning.callbacks.progress.tqdm_progress import Tqdm


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
