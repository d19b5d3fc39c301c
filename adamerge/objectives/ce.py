"""Supervised cross-entropy on labeled data (aTLAS's supervised setting, arXiv 2407.02880, Sec. 4).

Causal-LM batches carry ``labels`` with the prompt and padding masked (-100); classifier batches
carry class ids. The model's own loss is used, so label shifting follows the architecture.

The model is in eval mode (dropout off), as in aTLAS's few-shot loop (fredzzhang/atlas,
``src/learn_few_shots.py``): the zero-shot evaluation before training and the one after each epoch
call ``model.eval()`` (``src/eval.py``) on the encoder being trained, and nothing switches it back.
"""

from __future__ import annotations

import torch

from adamerge.data import model_inputs
from adamerge.objectives.base import Objective


class CrossEntropy(Objective):
    needs_labels = True
    dropout = False

    def task_loss(self, merged, task: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return merged(**model_inputs(batch), labels=batch["labels"]).loss
