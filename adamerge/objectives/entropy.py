"""AdaMerging's objective (arXiv 2310.02575, Sec. 3.2): entropy of the merged model's predictions.

Low prediction entropy on unlabeled test inputs correlates with low loss, so minimizing it adapts
the merge coefficients without labels. Classifiers: entropy of the class distribution. Causal LMs:
token entropy at the scored positions (``positions=last``, ``generated`` or ``all``, see ``base``).

The model stays in eval mode (dropout off), as in AdaMerging's loop
(``src/main_layer_wise_adamerging.py``): its evaluation before training calls ``model.eval()``
(``src/eval.py``) on the very encoder it then trains, and nothing switches it back.
"""

from __future__ import annotations

import torch

from adamerge.data import model_inputs
from adamerge.objectives.base import (
    Objective,
    entropy,
    is_causal_batch,
    masked_mean,
    pack_rows,
    scored_logits,
)


class Entropy(Objective):
    dropout = False

    def task_loss(self, merged, task: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if not is_causal_batch(batch):
            return entropy(merged(**model_inputs(batch)).logits).mean()
        rows, n_scored = self.scored_rows(merged, batch)
        inputs, scored = pack_rows(rows, n_scored, self.pad_id)
        logits = scored_logits(merged(**inputs).logits, scored.shape[1])
        return masked_mean(entropy(logits), scored)
