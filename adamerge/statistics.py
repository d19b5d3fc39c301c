"""Per-expert statistics of calibration data, for the closed-form merges (``adamerge/closed_form.py``).

Expert k is the merged model in teacher mode (``MergedModel.as_expert``, W0 + tau_k): no expert
model is loaded or kept. Each expert runs once over the first ``closed_form.examples`` rows of its own
task's data (in the data module's seeded order):

- Gram matrices (RegMean, arXiv 2212.09849): forward hooks on the Linear / Conv1D layers whose
  weight is merged accumulate ``X^T X`` of each layer's inputs in fp32, streamed per batch, over
  the non-padded positions, then divided by their count (the running mean of FusionBench's
  ``fusion_bench/method/regmean/clip_regmean.py``, so every expert weighs the same however long
  its rows are).
- The diagonal Fisher (Fisher merging, arXiv 2111.09832) by FusionBench's estimator
  (``fusion_bench/method/fisher_merging/fisher_merging.py``): per batch the gradient of
  ``sum_{rows, scored positions} sum_y sqrt(p(y)) log p(y)`` (p the expert's own predictive
  distribution, ``sqrt(p)`` held constant, so the label expectation is taken over the model's own
  outputs, no data label needed), squared, summed over batches and divided by the number of rows.

What the expert runs on is the objectives' scoring convention (``adamerge/objectives/base.py``):
a causal LM's prompt (``positions=last|all``) or prompt plus the expert's own greedy answer
(``positions=generated``); the Fisher's scored positions are those positions.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn
from torch.func import functional_call

from adamerge.data import model_inputs
from adamerge.merged import MergedModel
from adamerge.objectives.base import Objective, is_causal_batch, pack_rows, scored_logits

Batch = tuple[dict[str, torch.Tensor], torch.Tensor]  # model inputs, (B, P) mask of scored positions


def scored_batch(model: nn.Module, batch: Mapping[str, torch.Tensor], scorer: Objective) -> Batch:
    """Inputs and scored mask of a calibration batch: a causal LM's rows as ``scorer.positions`` says
    (with ``generated``, the model's own greedy answer appended), a classifier's batch as it is."""
    if not is_causal_batch(batch):
        return model_inputs(batch), torch.ones(len(batch["index"]), 1, dtype=torch.bool)
    rows, n_scored = scorer.scored_rows(model, batch)
    return pack_rows(rows, n_scored, scorer.pad_id)


def expert_batches(model: nn.Module, loader: Iterable[Mapping[str, torch.Tensor]], scorer: Objective,
                   examples: int) -> Iterator[Batch]:
    """Whole batches until at least ``examples`` rows (FusionBench's stopping rule), on the model's
    device; a merged model is the expert here in teacher mode (its greedy answers are the expert's)."""
    seen, device = 0, next(model.parameters()).device
    for batch in loader:
        if seen >= examples:
            return
        inputs, scored = scored_batch(model, {k: v.to(device) for k, v in batch.items()}, scorer)
        seen += len(scored)
        yield inputs, scored.to(device)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Statistics of the model as it predicts (dropout off), its mode restored after."""
    training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(training)


class GramHooks:
    """Forward hooks that add each layer's ``X^T X`` (fp32) over the positions ``mask`` keeps, while
    ``active`` (so that the forwards of a greedy answer, run between batches, are not counted)."""

    def __init__(self, layers: Mapping[str, nn.Module]) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}
        self.active = False
        self.mask: torch.Tensor | None = None  # (B, T) real tokens of the batch running now
        self.handles = [m.register_forward_hook(self.hook(name)) for name, m in layers.items()]

    def hook(self, name: str):
        def add(module: nn.Module, args: tuple, output) -> None:
            if not self.active:
                return
            x = args[0].detach()
            if self.mask is not None and x.shape[:-1] == self.mask.shape:
                x = x[self.mask]
            x = x.reshape(-1, x.shape[-1]).float()
            if name in self.sums:
                self.sums[name].addmm_(x.T, x)
            else:
                self.sums[name] = x.T @ x
            self.rows[name] = self.rows.get(name, 0) + x.shape[0]

        return add

    def means(self) -> dict[str, torch.Tensor]:
        return {name: s / max(self.rows[name], 1) for name, s in self.sums.items()}

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@torch.no_grad()
def expert_grams(merged: MergedModel, batches: Iterable[Batch], layers: Mapping[str, nn.Module]
                 ) -> dict[str, torch.Tensor]:
    """Mean ``X^T X`` of each layer's inputs, ``(in, in)`` fp32, keyed by the layer's weight name.
    Run inside ``merged.as_expert(k)`` with expert k's batches; a layer that never ran is absent."""
    hooks = GramHooks(layers)
    try:
        with eval_mode(merged):
            for inputs, _ in batches:
                mask = inputs.get("attention_mask")
                hooks.mask, hooks.active = (mask.bool() if mask is not None else None), True
                merged(**inputs)
                hooks.active = False
    finally:
        hooks.remove()
    return hooks.means()


def label_expectation(logits: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """``sum_{scored} sum_y sqrt(p(y)) log p(y)``: its squared gradient is FusionBench's Fisher estimate."""
    logp = torch.log_softmax(logits.float(), -1)
    per_position = (logp.detach().exp().sqrt() * logp).sum(-1)
    return (per_position * scored.to(per_position.dtype)).sum()


def expert_fisher(merged: MergedModel, batches: Iterable[Batch]) -> dict[str, torch.Tensor]:
    """Diagonal Fisher of every merged tensor (fp32, its shape): the squared batch gradients of
    ``label_expectation`` summed, over the number of rows. Run inside ``merged.as_expert(k)``."""
    weights = merged.merged_weights()  # teacher mode: W0 + tau_k of every merged tensor, and the task head
    leaves = {n: weights[n].detach().requires_grad_(True) for n in merged.names}
    params = {**{n: w.detach() for n, w in weights.items()}, **leaves}
    fisher = {n: torch.zeros(w.shape, dtype=torch.float32, device=w.device) for n, w in leaves.items()}
    rows = 0
    with eval_mode(merged), torch.enable_grad():
        for inputs, scored in batches:
            out = functional_call(merged.base, params, (), inputs, tie_weights=True, strict=False)
            total = label_expectation(scored_logits(out.logits, scored.shape[1]), scored)
            grads = torch.autograd.grad(total, list(leaves.values()), allow_unused=True)
            for name, grad in zip(leaves, grads, strict=True):
                if grad is not None:
                    fisher[name].add_(grad.float().square())
            rows += len(scored)
    return {n: f / max(rows, 1) for n, f in fisher.items()}
