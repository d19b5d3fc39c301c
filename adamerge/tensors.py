"""The description of one merged tensor: its name, shape, kind and feature axis (and which merged weights are
Linear / Conv1D layers').

Shared by the loader (``pool.py``), the task vectors, the granularities, the allocation and the plan; kept
apart from all of them so that each depends on it and none on another for it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

# Modules whose weight is stored (in_features, out_features) instead of nn.Linear's (out, in).
INPUT_FIRST_MODULES = {"Conv1D"}


@dataclass(frozen=True)
class TensorInfo:
    """What a granularity needs to know about one merged tensor."""

    name: str
    shape: tuple[int, ...]
    kind: str  # "matrix" (>= 2-D), "norm" (1-D of a norm/embedding module), "bias" or "vector"
    feature_dim: int | None  # axis of input features (matrix) or hidden dims (norm/vector); None for bias


def describe_tensor(model: nn.Module, name: str, param: torch.Tensor) -> TensorInfo:
    """Classify a parameter by its owning module, the small table that replaces per-family code."""
    module_name, _, leaf = name.rpartition(".")
    owner = type(model.get_submodule(module_name)).__name__ if module_name else type(model).__name__
    shape = tuple(param.shape)
    if param.dim() >= 2:
        return TensorInfo(name, shape, "matrix", 0 if owner in INPUT_FIRST_MODULES else 1)
    if "norm" in owner.lower():
        return TensorInfo(name, shape, "norm", 0)
    if leaf == "bias":
        return TensorInfo(name, shape, "bias", None)
    return TensorInfo(name, shape, "vector", 0)


def linear_layers(model: nn.Module, names: Iterable[str]) -> dict[str, nn.Module]:
    """Merged weight name -> its Linear or Conv1D module: the layers whose inputs' Gram matrices the
    closed-form merges solve with (``adamerge/closed_form.py``; the plan counts their memory)."""
    layers = {}
    for name in names:
        module_name, _, leaf = name.rpartition(".")
        if leaf != "weight" or not module_name:
            continue
        module = model.get_submodule(module_name)
        if isinstance(module, nn.Linear) or type(module).__name__ in INPUT_FIRST_MODULES:
            layers[name] = module
    return layers


def is_input_first(module: nn.Module) -> bool:
    """GPT-2's Conv1D stores its weight (in, out); nn.Linear stores (out, in)."""
    return type(module).__name__ in INPUT_FIRST_MODULES


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or Inf in ``tensor``: one reduction (any NaN or Inf makes the sum non-finite; 18x cheaper than the
    elementwise test on a 500 MB tensor), the elementwise test only where the sum itself overflows."""
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())
