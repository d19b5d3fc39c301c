"""Supervised cross-entropy on labeled data (aTLAS's supervised setting, arXiv 2407.02880, Sec. 4).

Causal-LM batches carry ``labels`` with the prompt and padding masked (-100); classifier batches
carry class ids. The model's own loss is used, so label shifting follows the architecture.
"""

from __future__ import annotations

import torch

from adamerge.data import model_inputs
from adamerge.objectives.base import Objective


class CrossEntropy(Objective):
    needs_labels = True

    def task_loss(self, merged, task: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return merged(**model_inputs(batch), labels=batch["labels"]).loss
