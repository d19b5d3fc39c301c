"""Coefficient heatmaps (experts x coefficient groups), for W&B logs and the notebook."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


def coefficient_matrix(table: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``(K, groups)``: each group's coefficients averaged over its columns/chunks."""
    return torch.stack([c.float().mean(1) for c in table.values()], 1)


def coefficient_heatmap(table: Mapping[str, torch.Tensor], experts: Sequence[str]):
    """A matplotlib figure of the coefficient matrix, one row per expert."""
    import matplotlib.pyplot as plt  # headless runs fall back to Agg; notebooks keep their inline backend

    matrix = coefficient_matrix(table).numpy()
    fig, ax = plt.subplots(figsize=(max(6, matrix.shape[1] * 0.12), 1 + 0.5 * len(experts)))
    image = ax.imshow(matrix, aspect="auto", cmap="viridis")
    ax.set_yticks(range(len(experts)), labels=list(experts))
    ax.set_xlabel("coefficient group (tensor order)")
    fig.colorbar(image, ax=ax, label="coefficient")
    fig.tight_layout()
    return fig


def log_heatmap(logger, merged) -> None:
    """Send the heatmap of the trained coefficients to a Lightning ``WandbLogger``."""
    import wandb

    fig = coefficient_heatmap(merged.granularity.table(), merged.experts)
    logger.experiment.log({"coefficients/heatmap": wandb.Image(fig)})
