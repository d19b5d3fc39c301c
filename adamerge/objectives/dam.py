"""DAM's objective (arXiv 2410.08371, Sec. 3): KL to each expert on its own data, plus a
diversity term.

Loss = ``sum_k T^2 KL(expert k || merged)`` on task k's data (T=2) +
``lambda_sim * mean over tensors of the mean pairwise cosine similarity between experts'
coefficient vectors`` + ``lambda_1 ||c||_1 + lambda_2 ||c||_2^2`` (off by default). It is
``Align`` without hidden states or the init regularizer, with its own regularizer.

Defaults follow the released trainer (arcee-ai/DAM, ``dam/custom_trainer/dam_trainer.py`` with
``dam/train_dam.py``'s defaults ``generate_logits_on_fly=True, use_all_logits=True``): the KL is
over the full vocabulary at every non-padded token of the calibration text, teacher-forced
(``positions=all``), averaged over those tokens (that trainer also divides by the batch size,
which its default batch size of 1 makes the same), with each expert's logits computed on the fly
(``teacher=online``). The model trains in train mode (dropout on): the HF ``Trainer`` it uses
calls ``model.train()`` every step. ``positions=generated`` scores greedy continuations instead.
"""

from __future__ import annotations

import torch

from adamerge.objectives.align import Align


def mean_pairwise_cosine(coef: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity over distinct pairs of rows of a ``(K, n)`` coefficient matrix."""
    unit = torch.nn.functional.normalize(coef.float(), dim=1)
    sim = unit @ unit.T
    k = coef.shape[0]
    return (sim.sum() - sim.diagonal().sum()) / max(k * (k - 1), 1)


class Dam(Align):
    def __init__(self, temperature: float = 2.0, lambda_sim: float = 0.01, lambda_l1: float = 0.0,
                 lambda_l2: float = 0.0, top_k: int | None = None, positions: str = "all", teacher: str = "online",
                 **kwargs) -> None:
        super().__init__(temperature=temperature, hidden_weight=0.0, coef_reg=0.0, top_k=top_k, positions=positions,
                         teacher=teacher, **kwargs)
        self.lambda_sim, self.lambda_l1, self.lambda_l2 = lambda_sim, lambda_l1, lambda_l2

    def regularizer(self, merged) -> torch.Tensor | None:
        groups = list(merged.granularity.groups().values())
        flat = torch.cat([c.flatten() for c in groups])
        loss = self.lambda_sim * torch.stack([mean_pairwise_cosine(c) for c in groups]).mean()
        return loss + self.lambda_l1 * flat.abs().sum() + self.lambda_l2 * flat.pow(2).sum()
