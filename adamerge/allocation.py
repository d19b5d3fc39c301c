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


def tensor_importance(coefficients: Mapping[str, torch.Tensor], stacks: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Normalized importance ``w_p`` of each tensor from ``(K, 1)`` stage-1 coefficients and its stack."""
    raw = {}
    for name, stack in stacks.items():
        tau_norms = stack.float().flatten(1).norm(dim=1)  # (K,)
        c = coefficients[name].float().abs().reshape(-1)
        raw[name] = float((c * tau_norms).sum()) / math.sqrt(stack[0].numel())
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
