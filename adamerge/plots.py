"""Coefficient heatmaps: one row per expert, one column per coefficient group (a tensor, in model order).

Used by the loggers (TensorBoard, W&B) and the notebook. The tensor axis is labelled with short
tensor names when they fit, else with the layer index at the first tensor of each layer.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch

MAX_NAMED_COLUMNS = 48  # beyond this, names overlap: label layers instead
MAX_LAYER_TICKS = 40
LAYER_INDEX = re.compile(r"\.(\d+)\.")


def coefficient_matrix(table: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``(K, groups)``: each group's coefficients averaged over its columns/chunks."""
    return torch.stack([c.float().mean(1) for c in table.values()], 1)


def short_names(names: Sequence[str]) -> list[str]:
    """Tensor names without the dotted prefix they all share and without ``.weight``:
    ``model.layers.0.mlp.up_proj.weight`` -> ``layers.0.mlp.up_proj``."""
    parts = [n.split(".") for n in names]
    shared = 0
    if len(parts) > 1:
        while all(len(p) > shared + 1 and p[shared] == parts[0][shared] for p in parts):
            shared += 1
    return [".".join(p[shared:]).removesuffix(".weight") for p in parts]


def tensor_ticks(names: Sequence[str]) -> tuple[list[int], list[str], str]:
    """Positions, labels and axis title for the tensor axis."""
    if len(names) == 1 and names[0] == "task":
        return [0], ["all tensors"], "one coefficient per expert (task-wise)"
    if len(names) <= MAX_NAMED_COLUMNS:
        return list(range(len(names))), short_names(names), "tensor"
    starts: list[tuple[int, str]] = []
    for i, name in enumerate(names):
        match = LAYER_INDEX.search(name)
        if match and (not starts or starts[-1][1] != match[1]):
            starts.append((i, match[1]))
    stride = max(1, -(-len(starts) // MAX_LAYER_TICKS))
    starts = starts[::stride]
    return [i for i, _ in starts], [label for _, label in starts], "layer (a column per tensor, in model order)"


def coefficient_heatmap(table: Mapping[str, torch.Tensor], experts: Sequence[str]):
    """A matplotlib figure of the coefficient matrix, one row per expert."""
    import matplotlib.pyplot as plt  # headless runs fall back to Agg; notebooks keep their inline backend

    matrix = coefficient_matrix(table).numpy()
    positions, labels, title = tensor_ticks(list(table))
    named = title == "tensor"
    width = min(24.0, max(6.0, 0.28 * matrix.shape[1])) if named else max(6.0, min(24.0, 0.05 * matrix.shape[1]))
    fig, ax = plt.subplots(figsize=(width, 1.2 + 0.45 * len(experts) + (1.8 if named else 0.4)))
    image = ax.imshow(matrix, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(experts)), labels=list(experts))
    ax.set_ylabel("expert")
    ax.set_xticks(positions, labels=labels, rotation=90 if named else 0, fontsize=7 if named else 9)
    ax.set_xlabel(title)
    fig.colorbar(image, ax=ax, label="coefficient (mean per tensor)")
    fig.tight_layout()
    return fig
