"""The calibration data as Lightning serves it: one loader per task, every task in each training step.

Kept apart from ``data.py`` (rows, tokenization, batches), which runs that do not train read too: only a run
with calibration data imports Lightning for it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import CombinedLoader
from torch.utils.data import DataLoader, DistributedSampler

from adamerge.data import Collator, Examples
from adamerge.errors import AdamergeError


class ResumableLoader(DataLoader):
    """A training loader that Lightning checkpoints (``state_dict`` / ``load_state_dict``).

    Its sampler is a ``DistributedSampler`` whose order depends only on (seed, epoch), and it
    remembers how many batches of the current pass it has served; a run resumed from a mid-epoch
    checkpoint skips those, so it sees exactly the batches an uninterrupted run would.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._served = 0
        self._resume: dict | None = None

    def __iter__(self):
        epoch = getattr(self.sampler, "epoch", 0)
        state, self._resume = self._resume, None
        skip = state["batches"] if state and state["epoch"] == epoch and state["batches"] < len(self) else 0
        self._served = 0
        for batch in super().__iter__():
            self._served += 1
            if self._served > skip:
                yield batch

    def state_dict(self) -> dict:
        return {"epoch": getattr(self.sampler, "epoch", 0), "batches": self._served}

    def load_state_dict(self, state: dict) -> None:
        self._resume = dict(state)


class TaskDataModule(pl.LightningDataModule):
    """Serves one loader per task; a training step receives ``{task: batch}`` with every task in it.

    Lightning's ``CombinedLoader`` in ``max_size_cycle`` mode cycles the shorter tasks, as
    AdaMerging's loop does. Training loaders shard the data themselves (``DistributedSampler``, so
    Lightning keeps them: its own training sampler would always shuffle): with ``shuffle`` off,
    rank r of W gets examples r, r + W, ..., so W ranks at batch B see the rows one process sees at
    batch W * B. The order depends only on (seed, task, epoch), and loaders resume mid-epoch.
    """

    def __init__(self, tasks: Mapping[str, Sequence[dict]], collator: Collator, batch_size: int = 8,
                 shuffle: bool = True, seed: int = 0) -> None:
        super().__init__()
        if not tasks:
            raise AdamergeError("no calibration data: set data.paths.TASK=FILE for each expert")
        self.datasets = {name: Examples(rows) for name, rows in tasks.items()}
        self.collator, self.batch_size, self.shuffle, self.seed = collator, batch_size, shuffle, seed

    def task_seed(self, task: str) -> int:
        return self.seed + sum(map(ord, task))

    def loader(self, task: str, shuffle: bool | None = None) -> DataLoader:
        """All of a task's examples (teacher caching, checks); not sharded across ranks."""
        shuffle = self.shuffle if shuffle is None else shuffle
        generator = torch.Generator().manual_seed(self.task_seed(task))
        return DataLoader(self.datasets[task], batch_size=self.batch_size, shuffle=shuffle,
                          collate_fn=self.collator, generator=generator)

    def train_loader(self, task: str) -> ResumableLoader:
        """This rank's shard of a task, in an order set by (seed, task, epoch)."""
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer is not None else (1, 0)
        sampler = DistributedSampler(self.datasets[task], num_replicas=world, rank=rank, shuffle=self.shuffle,
                                     seed=self.task_seed(task))
        return ResumableLoader(self.datasets[task], batch_size=self.batch_size, sampler=sampler,
                               collate_fn=self.collator)

    def train_dataloader(self) -> CombinedLoader:
        return CombinedLoader({t: self.train_loader(t) for t in self.datasets}, mode="max_size_cycle")


class DataFree(pl.LightningDataModule):
    """One placeholder batch per step for data-free objectives (DOGE): ``{"all": {"step": ...}}``."""

    def __init__(self, steps: int) -> None:
        super().__init__()
        self.steps = max(steps, 1)

    def train_dataloader(self) -> CombinedLoader:
        steps = DataLoader(torch.arange(self.steps), batch_size=1, collate_fn=lambda xs: {"step": torch.stack(xs)})
        return CombinedLoader({"all": steps}, mode="max_size_cycle")
