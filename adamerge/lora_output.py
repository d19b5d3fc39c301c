"""The merge written as a PEFT LoRA adapter (``output.format=lora``, or ``both`` beside the full checkpoint).

When every expert changing a matrix is a LoRA adapter (arXiv 2106.09685) and the coefficients are constant
along one of its axes (``task``, ``layer``, row ``chunk``s, ``column``; ``merged.fits_factors``), the merged
delta ``sum_k c_k B_k A_k`` is itself a LoRA of rank ``sum_k r_k``: the experts' factors, scaled by the
coefficients and concatenated (``merged.factor_operands``). It is written as is, exactly. ``output.rank``
compresses it to that rank by the SVD of the merged delta (Eckart-Young: the best rank-r approximation in
Frobenius norm), computed from the factors through two thin QRs, never densified. Matrices whose merged delta
is dense (full experts, mixed pools, weight space, element-wise chunks) are approximated by a truncated SVD at
``output.rank``; without a rank they are refused, as no exact low-rank form exists.

Tensors that are not matrices of a Linear / Embedding / Conv1D (norms, biases, ...) and changed, and, in a pool
of LoRA adapters only, dense matrices (the experts' own ``modules_to_save``), are stored whole through peft's
``modules_to_save``: their module's merged values, exactly. Where that module is itself a LoRA target (a
Linear's bias) it cannot be: the tensor is dropped, and the log and the model card name it. Every tensor's
relative Frobenius error ``||D - D_r|| / ||D||`` and the overall one (dropped tensors count fully) are logged,
written to ``adapter_report.json`` and shown in the model card.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from adamerge.errors import AdamergeError
from adamerge.export import first_nonfinite
from adamerge.merged import MergedModel, factor_operands, fits_factors
from adamerge.pool import ExpertPool, is_adapter
from adamerge.taskvectors import LoraFactors

log = logging.getLogger(__name__)

FORMATS = ("full", "lora", "both")
ADAPTER_DIR = "adapter"  # output.format=both: the adapter's place inside output_dir
REPORT_FILE = "adapter_report.json"
LORA_MODULES = ("Linear", "Embedding", "Conv1D")  # module classes peft's LoRA targets, by name
PREFIX = "base_model.model."  # peft's key prefix in adapter_model.safetensors


def output_options(config: Mapping[str, Any]) -> tuple[str, int | None]:
    """``output.format`` and ``output.rank``, checked (before anything is loaded)."""
    options = config.get("output") or {}
    fmt, rank = options.get("format", "full"), options.get("rank")
    if fmt not in FORMATS:
        raise AdamergeError(f"output.format={fmt!r}; choose from {', '.join(FORMATS)}")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise AdamergeError(f"output.rank={rank!r} must be a positive integer or null (null: the exact rank)")
    return fmt, rank


def lora_module(model: nn.Module, name: str) -> str | None:
    """The module whose LoRA would hold tensor ``name``: a Linear, Embedding or Conv1D weight matrix."""
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    is_matrix = leaf == "weight" and getattr(module, "weight", None) is not None and module.weight.dim() == 2
    return module_name if is_matrix and type(module).__name__ in LORA_MODULES else None


def all_adapters(pool: ExpertPool) -> bool:
    return all(is_adapter(source) for source in pool.expert_sources.values())


def kept_as_factors(merged: MergedModel, name: str) -> bool:
    """The merge of matrix ``name`` keeps LoRA factors: task-vector space, coefficients constant along an axis."""
    return merged.granularity.space == "task_vectors" and fits_factors(merged.granularity.broadcast(name).shape)


def storage(merged: MergedModel, name: str, adapters_only: bool) -> str:
    """How tensor ``name``'s merged delta goes into the adapter: ``factors`` (exact LoRA), ``svd`` (a dense
    matrix delta, truncated) or ``whole`` (``modules_to_save``: not a LoRA-able matrix, or, in a pool of
    adapters only, a matrix they changed densely themselves, as their own ``modules_to_save``)."""
    if lora_module(merged.base, name) is None:
        return "whole"
    if kept_as_factors(merged, name):
        return "factors" if isinstance(merged.source(name), LoraFactors) else "whole" if adapters_only else "svd"
    return "svd"


def check_adapter_fits(merged: MergedModel, pool: ExpertPool, rank: int | None) -> None:
    """Refuse, before training, an adapter that cannot be written: per-task heads, or a dense matrix
    delta without ``output.rank`` (it has no exact low-rank form)."""
    if len(merged.heads):
        raise AdamergeError("output.format=lora|both does not take per-task heads (classifiers): use "
                            "output.format=full")
    adapters_only = all_adapters(pool)
    dense = next((n for n in merged.names if storage(merged, n, adapters_only) == "svd"), None)
    if dense is not None and rank is None:
        raise AdamergeError(f"output.format=lora needs output.rank=R here: the merged delta of {dense!r} is not "
                            "exactly low-rank (full experts, weight space or element-wise coefficients)")


@dataclass
class Adapter:
    """A LoRA adapter of the merge: ``lora[module] = (left, right)`` with ``left @ right`` the delta of the
    module's weight (as stored), ``whole[module]`` the merged state of a ``modules_to_save`` module."""

    lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    whole: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    errors: dict[str, float] = field(default_factory=dict)  # tensor -> relative Frobenius error
    dropped: list[str] = field(default_factory=list)
    energy: dict[str, tuple[float, float]] = field(default_factory=dict)  # tensor -> (lost, total) squared norm

    @property
    def overall_error(self) -> float:
        lost, total = (sum(v) for v in zip(*self.energy.values(), strict=True)) if self.energy else (0.0, 0.0)
        return (lost / total) ** 0.5 if total > 0 else 0.0

    def report(self) -> dict[str, Any]:
        ranks = {m: left.shape[1] for m, (left, _) in self.lora.items()}
        return {"overall_relative_error": self.overall_error, "relative_error": self.errors, "ranks": ranks,
                "modules_to_save": sorted(self.whole), "dropped": self.dropped}


def truncated(left: torch.Tensor, right: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """The best rank-``rank`` factors of ``left @ right`` and (lost, total) squared Frobenius norm.

    ``left @ right = Q1 (R1 R2^T) Q2^T`` from thin QRs of ``left`` and ``right^T``: the SVD of the small
    core gives the SVD of the product without forming it."""
    q1, r1 = torch.linalg.qr(left)
    q2, r2 = torch.linalg.qr(right.T)
    u, s, vh = torch.linalg.svd(r1 @ r2.T, full_matrices=False)
    lost, total = s[rank:].square().sum().item(), s.square().sum().item()
    return (q1 @ u[:, :rank]) * s[:rank], vh[:rank] @ q2.T, lost, total


def dense_svd(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Truncated SVD of a dense matrix delta: factors and (lost, total) squared Frobenius norm."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    lost, total = s[rank:].square().sum().item(), s.square().sum().item()
    return u[:, :rank] * s[:rank], vh[:rank], lost, total


def factor_energy(left: torch.Tensor, right: torch.Tensor) -> float:
    """``||left @ right||_F^2`` without the product: ``sum((L^T L) * (R R^T))``."""
    return ((left.T @ left) * (right @ right.T)).sum().item()


def build_adapter(merged: MergedModel, folded: nn.Module, pool: ExpertPool, rank: int | None) -> Adapter:
    """The adapter of the merge ``folded`` (= ``merged.fold()``) on ``merged.base``, tensor by tensor."""
    check_adapter_fits(merged, pool, rank)
    base, merged_params, adapter = dict(merged.base.named_parameters()), dict(folded.named_parameters()), Adapter()
    adapters_only, whole = all_adapters(pool), []
    with torch.no_grad():
        for name in merged.names:
            kind, module = storage(merged, name, adapters_only), lora_module(merged.base, name)
            if kind == "whole":
                whole.append(name)
                continue
            if kind == "factors":
                operands = factor_operands(merged.source(name), merged.granularity.broadcast(name))
                left, right = operands[0].float(), operands[1].float()
                if rank is None or rank >= left.shape[1]:
                    adapter.lora[module], adapter.energy[name] = (left, right), (0.0, factor_energy(left, right))
                    continue
                left, right, lost, total = truncated(left, right, rank)
            else:
                left, right, lost, total = dense_svd(merged_params[name].float() - base[name].float(), rank)
            adapter.lora[module], adapter.energy[name] = (left, right), (lost, total)
        for name in whole:
            add_whole(adapter, folded, name, (merged_params[name].float() - base[name].float()).square().sum().item())
    adapter.errors = {n: (lost / total) ** 0.5 if total > 0 else 0.0 for n, (lost, total) in adapter.energy.items()}
    log_report(adapter)
    return adapter


def add_whole(adapter: Adapter, folded: nn.Module, name: str, total: float) -> None:
    """Tensor ``name`` stored exactly with its whole module (``modules_to_save``), or dropped where that
    module is, or holds, a LoRA target."""
    module = name.rpartition(".")[0]
    if not module or any(t == module or t.startswith(f"{module}.") for t in adapter.lora):
        adapter.dropped.append(name)
        adapter.energy[name] = (total, total)
        return
    adapter.whole[module] = {k: v.detach().clone() for k, v in folded.get_submodule(module).state_dict().items()}
    adapter.energy[name] = (0.0, total)


def log_report(adapter: Adapter) -> None:
    approximated = {n: e for n, e in adapter.errors.items() if e > 0 and n not in adapter.dropped}
    if approximated:
        worst = max(approximated, key=approximated.get)
        log.info("LoRA adapter: %d of %d tensor(s) truncated by SVD, relative Frobenius error %.4g overall, "
                 "at most %.4g (%s)", len(approximated), len(adapter.errors), adapter.overall_error,
                 approximated[worst], worst)
    if adapter.dropped:
        log.warning("LoRA adapter: %d changed tensor(s) cannot be LoRA or modules_to_save and are left out (their "
                    "module is a LoRA target): %s", len(adapter.dropped), ", ".join(adapter.dropped))


def peft_tensors(adapter: Adapter, model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``adapter_model.safetensors`` in peft's layout, scaling 1 (``lora_alpha = r`` per module).

    Linear: ``W += B @ A``; Conv1D (``fan_in_fan_out``) and Embedding store the transpose: ``W += (B @ A)^T``."""
    tensors = {}
    for module, (left, right) in adapter.lora.items():
        kind = type(model.get_submodule(module)).__name__
        b, a = (right.T, left.T) if kind in ("Conv1D", "Embedding") else (left, right)
        if kind == "Embedding":
            tensors[f"{PREFIX}{module}.lora_embedding_A"], tensors[f"{PREFIX}{module}.lora_embedding_B"] = a, b
        else:
            tensors[f"{PREFIX}{module}.lora_A.weight"], tensors[f"{PREFIX}{module}.lora_B.weight"] = a, b
    for module, state in adapter.whole.items():
        tensors.update({f"{PREFIX}{module}.{k}": v for k, v in state.items()})
    return {k: v.to(device="cpu", dtype=dtype).contiguous() for k, v in tensors.items()}


def peft_config(adapter: Adapter, model: nn.Module, base_source: str | None):
    """``adapter_config.json``: every module named in full; the most common rank as ``r``, the others in
    ``rank_pattern``, ``lora_alpha`` equal to the rank everywhere (scaling 1: the factors carry the scale)."""
    from peft import LoraConfig

    ranks = {m: left.shape[1] for m, (left, _) in adapter.lora.items()}
    r = max(set(ranks.values()), key=list(ranks.values()).count) if ranks else 1
    pattern = {m: v for m, v in ranks.items() if v != r}
    ambiguous = next((m for m in adapter.whole for other, _ in model.named_modules()
                      if other != m and other.endswith(m)), None)
    if ambiguous is not None:  # peft matches modules_to_save by suffix
        raise AdamergeError(f"the LoRA adapter cannot store module {ambiguous!r} whole: peft would also match "
                            "another module ending in that name; use output.format=full")
    conv1d = any(type(model.get_submodule(m)).__name__ == "Conv1D" for m in ranks)
    return LoraConfig(r=r, lora_alpha=r, target_modules=sorted(ranks), rank_pattern=pattern, alpha_pattern=pattern,
                        modules_to_save=sorted(adapter.whole) or None, fan_in_fan_out=conv1d, lora_dropout=0.0,
                        base_model_name_or_path=base_source, inference_mode=True)


def write_adapter(adapter: Adapter, model: nn.Module, directory: Path, base_source: str | None) -> None:
    """``adapter_config.json`` + ``adapter_model.safetensors`` (+ the error report) into ``directory``: what
    ``PeftModel.from_pretrained(base, directory)`` loads. Non-finite values are refused."""
    dtype = next(model.parameters()).dtype
    tensors = peft_tensors(adapter, model, dtype)
    bad = first_nonfinite(tensors)
    if bad is not None:
        raise AdamergeError(f"the LoRA adapter is not finite ({bad!r} holds NaN/Inf); nothing was written")
    config = peft_config(adapter, model, base_source)
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(directory))
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    (directory / REPORT_FILE).write_text(json.dumps(adapter.report(), indent=2))


def card_section(adapter: Adapter, fmt: str) -> list[str]:
    """Markdown for the model card: where the adapter is, its ranks, errors and what it leaves out."""
    where = f"`{ADAPTER_DIR}/`" if fmt == "both" else "this directory"
    ranks = sorted({left.shape[1] for left, _ in adapter.lora.values()})
    lines = [f"A PEFT LoRA adapter of the merge is in {where} (`PeftModel.from_pretrained(base, DIR)`); ranks "
             f"{', '.join(map(str, ranks)) or 'none'}, relative Frobenius error of the merged delta "
             f"{adapter.overall_error:.3g} overall.", ""]
    if adapter.whole:
        lines += ["Stored whole (`modules_to_save`): " + ", ".join(f"`{m}`" for m in sorted(adapter.whole)) + ".", ""]
    if adapter.dropped:
        lines += ["Left out (changed, but their module is a LoRA target): "
                  + ", ".join(f"`{n}`" for n in adapter.dropped) + ".", ""]
    lines += ["| tensor | relative error |", "|---|---|"]
    return lines + [f"| `{n}` | {e:.3g} |" for n, e in adapter.errors.items()]
