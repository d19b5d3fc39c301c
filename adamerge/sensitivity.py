"""Sens-Merging (arXiv 2502.12420): layer-wise coefficients from sensitivity on calibration data.

Two scalings, computed once before training from each task's calibration rows, with every expert run
in teacher mode (no expert loaded again):

- task-specific: the sensitivity of layer l for expert i is ``s_i^l = sum_{p in l} |theta_i,p * dL_i/dtheta_i,p|``
  (first-order Taylor estimate of the loss change if the parameters were removed), ``L_i`` expert i's
  next-token loss on its own task's rows, summed over the batches; ``alpha_i^l = s_i^l / ||s_i||_2``
  over the layers. A layer is a transformer block (the tensor's name up to its ``.N.``), or one tensor
  outside the blocks (embeddings, final norm, head).
- cross-task: ``g_ij`` is the mean L2 distance between expert i's and expert j's logits on task j's rows
  (every non-padded position), ``tau_i = sum_j g_ij / sum_ij g_ij``.

The coefficient of expert i on layer l is ``scale * K * softmax_i(alpha_i^l * tau_i / T)``: ``scale`` the
base method's lambda (Sens-Merging rescales task arithmetic, TIES, DARE), a uniform softmax giving it back.
The authors released no code (as of this writing); the formulas are the paper's as followed by the
open reimplementation github.com/ZeroNLP/RCP-Merging, ``baselines/sensmerge/sens_merging.py`` (softmax
temperature 1, ``K * sigma``), which sums per-sample sensitivities: here the batches of
``data.batch_size`` rows are the samples (``data.batch_size=1`` gives the per-row sum).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch
from torch.func import functional_call

from adamerge.data import model_inputs
from adamerge.errors import AdamergeError
from adamerge.granularity import BLOCK_INDEX

log = logging.getLogger(__name__)


def layer_of(name: str) -> str:
    """The paper's layer of a tensor: its name up to the block index (``model.layers.3``), else the tensor."""
    match = BLOCK_INDEX.search(name)
    return name[: match.end() - 1] if match else name


def next_token_loss(logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of every next token predicted from a real (non-padded) one."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    scored = (mask[:, :-1] * mask[:, 1:]).bool()
    return torch.nn.functional.cross_entropy(logits[:, :-1][scored].float(), ids[:, 1:][scored])


def expert_sensitivity(merged, k: int, batches: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, float]:
    """``s_k^l``: the sum over batches of ``sum |theta * grad|`` of expert k's merged tensors, per layer."""
    w0 = dict(merged.base.named_parameters())
    theta = {n: (w0[n] + merged.expert_delta(n, k).to(w0[n].dtype)).detach().requires_grad_(True) for n in merged.names}
    sums: dict[str, float] = {}
    for batch in batches:
        inputs = {key: v.to(w0[merged.names[0]].device) for key, v in model_inputs(batch).items()}
        logits = functional_call(merged.base, theta, (), inputs, tie_weights=True, strict=False).logits
        grads = torch.autograd.grad(next_token_loss(logits, inputs), list(theta.values()), allow_unused=True)
        for (name, value), grad in zip(theta.items(), grads, strict=True):
            if grad is not None:
                sums[layer_of(name)] = sums.get(layer_of(name), 0.0) + (value.detach() * grad).abs().sum().item()
    return sums


@torch.no_grad()
def logit_gap(merged, i: int, j: int, batches: Sequence[Mapping[str, torch.Tensor]]) -> float:
    """``g_ij``: mean over task j's batches of the mean L2 distance of experts i's and j's logits per position."""
    gaps, device = [], merged.base.get_parameter(merged.names[0]).device
    for batch in batches:
        inputs = {key: v.to(device) for key, v in model_inputs(batch).items()}
        with merged.as_expert(i):
            logits_i = merged(**inputs).logits.float()
        with merged.as_expert(j):
            logits_j = merged(**inputs).logits.float()
        real = inputs["attention_mask"].bool()
        gaps.append((logits_i - logits_j).norm(dim=-1)[real].mean().item())
    return sum(gaps) / len(gaps)


def task_specific_scaling(sensitivities: Sequence[Mapping[str, float]], layers: Sequence[str]) -> torch.Tensor:
    """``(K, L)`` alpha: each expert's layer sensitivities over their L2 norm."""
    s = torch.tensor([[float(sens.get(layer, 0.0)) for layer in layers] for sens in sensitivities])
    return s / s.norm(dim=1, keepdim=True).clamp(min=torch.finfo(s.dtype).tiny)


def cross_task_scaling(gaps: torch.Tensor) -> torch.Tensor:
    """``(K,)`` tau from the ``(K, K)`` logit gaps ``g_ij`` (diagonal zero): row sums over their total."""
    rows = gaps.sum(1)
    return rows / rows.sum() if rows.sum() > 0 else torch.full_like(rows, 1.0 / len(rows))


def sens_coefficients(alpha: torch.Tensor, tau: torch.Tensor, temperature: float = 1.0,
                      scale: float = 1.0) -> torch.Tensor:
    """``(K, L)`` coefficients ``scale * K * softmax over experts of alpha * tau / T``."""
    return scale * alpha.shape[0] * torch.softmax(alpha * tau[:, None] / temperature, dim=0)


def sens_table(merged, data, temperature: float = 1.0, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Sens-Merging's coefficients as a table for ``granularity.load_table``: ``(K, 1)`` per coefficient group,
    every tensor of a group in the same layer."""
    granularity = merged.granularity
    groups: dict[str, set[str]] = {}
    for name in merged.names:
        groups.setdefault(granularity.keys[name].replace("/", "."), set()).add(layer_of(name))
    mixed = next((g for g, layers in groups.items() if len(layers) > 1), None)
    if mixed is not None:
        raise AdamergeError(f"granularity.init=sens sets one coefficient per layer, but group {mixed!r} spans "
                            f"{len(groups[mixed])} layers: use granularity=layer, block, chunk or column")
    missing = [e for e in merged.experts if e not in data.datasets]
    if missing:
        raise AdamergeError(f"granularity.init=sens needs calibration data for every expert; none for {missing}")
    batches = {e: list(data.loader(e, shuffle=False)) for e in merged.experts}
    if any("position_ids" not in b for task_batches in batches.values() for b in task_batches):
        raise AdamergeError("granularity.init=sens scores next-token losses and logits: it needs a causal LM")
    layers = sorted({layer_of(n) for n in merged.names})
    alpha = task_specific_scaling([expert_sensitivity(merged, k, batches[e]) for k, e in enumerate(merged.experts)],
                                  layers)
    k = len(merged.experts)
    gaps = torch.tensor([[logit_gap(merged, i, j, batches[merged.experts[j]]) if i != j else 0.0 for j in range(k)]
                         for i in range(k)])
    coefficients = sens_coefficients(alpha, cross_task_scaling(gaps), temperature, scale)
    column = {layer: coefficients[:, i : i + 1] for i, layer in enumerate(layers)}
    return {group: column[next(iter(layer_set))] for group, layer_set in groups.items()}


def require_data(data) -> None:
    """Refuse ``granularity.init=sens`` without calibration data (rows or a data module)."""
    if data is None:
        raise AdamergeError("granularity.init=sens computes the coefficients from calibration data: set "
                            "data.paths.TASK=FILE for every expert (and an objective that reads data)")


def apply_sens_init(merged, data) -> None:
    """``granularity.init=sens``: replace the provisional coefficients by Sens-Merging's, before training."""
    require_data(data)
    g = merged.granularity
    table = sens_table(merged, data, g.sens_temperature, g.sens_scale)
    values = torch.cat(list(table.values()), dim=1)
    g.checked(values.flatten().tolist())  # e.g. above 1 under transform=sigmoid: refused, not NaN
    g.load_table(table)
    log.info("Sens-Merging init: per expert min / mean / max %s", [
        f"{lo:.3f} / {mean:.3f} / {hi:.3f}" for lo, mean, hi in zip(
            values.min(1).values.tolist(), values.mean(1).tolist(), values.max(1).values.tolist(), strict=True)])
