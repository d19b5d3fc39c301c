"""Expert Merging++'s importance-guided chunk allocation (arXiv 2509.25712, Sec. 3.4).

Stage 1 learns one coefficient per expert per tensor. From it, the importance of tensor p is the
root-mean-square size of the update that the learned merge applies to it, per parameter:

    I_p = sum_k |c_{k,p}| * ||tau_{k,p}||_F / sqrt(N_p)        (N_p = number of parameters of p)

normalized to a distribution ``w_p = I_p / sum_q I_q``. A total budget of B chunks gives every
tensor one chunk and hands out the remaining ``B - P`` by ``w_p`` with the largest-remainder
rule (so the counts sum to B exactly), never more chunks than a tensor has rows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from adamerge.errors import AdamergeError
from adamerge.tensors import TensorInfo


def tensor_importance(coefficients: Mapping[str, torch.Tensor], sq_norms: Mapping[str, torch.Tensor],
                      infos: Mapping[str, TensorInfo]) -> dict[str, float]:
    """Normalized importance ``w_p`` of each tensor from ``(K, 1)`` stage-1 coefficients and the
    squared norms ``||tau_{k,p}||_F^2`` (``TaskVectors.sq_norms``, LoRA factors never densified)."""
    raw = {}
    for name, sq in sq_norms.items():
        c = coefficients[name].float().abs().reshape(-1)
        raw[name] = float((c * sq.sqrt()).sum()) / math.sqrt(math.prod(infos[name].shape))
    total = sum(raw.values())
    if total <= 0:
        return {name: 1.0 / len(raw) for name in raw}
    return {name: v / total for name, v in raw.items()}


def allocate_chunks(importance: Mapping[str, float], budget: int, rows: Mapping[str, int]) -> dict[str, int]:
    """Counts >= 1 per tensor summing to ``budget`` (as far as row limits allow), proportional to importance."""
    names = list(importance)
    if budget < len(names):
        raise AdamergeError(f"granularity.budget={budget} is below the number of merged tensors ({len(names)})")
    counts = dict.fromkeys(names, 1)
    left = budget - len(names)
    while left > 0:
        open_names = [n for n in names if counts[n] < rows[n]]
        if not open_names:
            break
        weight = sum(importance[n] for n in open_names) or 1.0
        shares = {n: left * importance[n] / weight for n in open_names}
        given = 0
        for n in open_names:
            extra = min(int(shares[n]), rows[n] - counts[n])
            counts[n] += extra
            given += extra
        by_remainder = sorted(open_names, key=lambda n: shares[n] - int(shares[n]), reverse=True)
        for n in by_remainder[: left - given]:
            if counts[n] < rows[n]:
                counts[n] += 1
                given += 1
        if given == 0:
            break
        left -= given
    return counts
