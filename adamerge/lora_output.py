"""The merge written as a PEFT LoRA adapter (``output.format=lora``, or ``both`` beside the full checkpoint).

When every expert changing a matrix is a LoRA adapter (arXiv 2106.09685) and the coefficients are constant
along one of its axes (``task``, ``layer``, row ``chunk``s, ``column``; ``merged.fits_factors``), the merged
delta ``sum_k c_k B_k A_k`` is itself a LoRA of rank ``sum_k r_k``: the experts' factors, scaled by the
coefficients and concatenated (``merged.factor_operands``). It is written as is, exactly. ``output.rank``
compresses it to that rank by the SVD of the merged delta (Eckart-Young: the best rank-r approximation in
Frobenius norm), computed from the factors through two thin QRs, never densified. Matrices whose merged delta
is dense (full experts, mixed pools, weight space, element-wise chunks) are approximated by a truncated SVD at
``output.rank``; without a rank they are refused, as no exact low-rank form exists.

Changed biases of LoRA targets go into peft's ``lora_bias`` (which Embedding LoRA does not take: embeddings are
then stored whole). Other changed tensors that are not matrices of a Linear / Embedding / Conv1D (norms, ...)
and, in a pool of LoRA adapters only, dense matrices (the experts' own ``modules_to_save``) are stored whole
through peft's ``modules_to_save``: their module's merged values, exactly. Where that module holds a LoRA target
it cannot be: the tensor is dropped, and the log and the model card name it. An output head tied to the input
embeddings gets their LoRA factors, or their merged values, too (peft adapts each module apart). Every tensor's
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
    """Refuse, before training, an adapter that cannot be written: per-task heads, experts' added tokens, or a
    dense matrix delta without ``output.rank`` (it has no exact low-rank form)."""
    if len(merged.heads):
        raise AdamergeError("output.format=lora|both does not take per-task heads (classifiers): use "
                            "output.format=full")
    if merged.added is not None:
        raise AdamergeError("output.format=lora|both cannot hold the rows of tokens the experts added: use "
                            "output.format=full, or pool.tokenizer=base to drop them")
    adapters_only = all_adapters(pool)
    dense = next((n for n in merged.names if storage(merged, n, adapters_only) == "svd"), None)
    if dense is not None and rank is None:
        raise AdamergeError(f"output.format=lora needs output.rank=R here: the merged delta of {dense!r} is not "
                            "exactly low-rank (full experts, weight space or element-wise coefficients)")


@dataclass
class Adapter:
    """A LoRA adapter of the merge: ``lora[module] = (left, right)`` with ``left @ right`` the delta of the
    module's weight (as stored), ``bias[module]`` the delta of its bias (peft's ``lora_bias``),
    ``whole[module]`` the merged state of a ``modules_to_save`` module."""

    lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    bias: dict[str, torch.Tensor] = field(default_factory=dict)
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
                "lora_bias": sorted(self.bias), "modules_to_save": sorted(self.whole), "dropped": self.dropped}


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
    adapter, whole, adapters_only = Adapter(), [], all_adapters(pool)
    with torch.no_grad():
        for name in merged.names:
            if storage(merged, name, adapters_only) == "whole":
                whole.append(name)
            else:
                add_lora(adapter, merged, folded, name, rank)
        whole += whole_embeddings_for_biases(adapter, merged.base, whole)
        add_tied(adapter, merged.base)
        for name in whole:
            add_whole(adapter, folded, name, dense_delta(merged, folded, name))
    adapter.errors = {n: (lost / total) ** 0.5 if total > 0 else 0.0 for n, (lost, total) in adapter.energy.items()}
    log_report(adapter)
    return adapter


def dense_delta(merged: MergedModel, folded: nn.Module, name: str) -> torch.Tensor:
    """Merged minus base value of tensor ``name``, in fp32."""
    return folded.get_parameter(name).float() - merged.base.get_parameter(name).float()


def add_lora(adapter: Adapter, merged: MergedModel, folded: nn.Module, name: str, rank: int | None) -> None:
    """Matrix ``name``'s merged delta as LoRA factors: the experts' own (exact, or truncated to ``rank``), or
    the truncated SVD of the dense delta."""
    module = lora_module(merged.base, name)
    source = merged.source(name)
    if isinstance(source, LoraFactors):
        left, right = (t.float() for t in factor_operands(source, merged.granularity.broadcast(name)))
        if rank is None or rank >= left.shape[1]:
            adapter.lora[module], adapter.energy[name] = (left, right), (0.0, factor_energy(left, right))
            return
        left, right, lost, total = truncated(left, right, rank)
    else:
        left, right, lost, total = dense_svd(dense_delta(merged, folded, name), rank)
    adapter.lora[module], adapter.energy[name] = (left, right), (lost, total)


def whole_embeddings_for_biases(adapter: Adapter, model: nn.Module, whole: list[str]) -> list[str]:
    """Changed biases of LoRA targets need peft's ``lora_bias``, which Embedding LoRA does not take: such
    embeddings leave the LoRA targets and are stored whole (exact, larger). Returns their weights' names."""
    biased = [n for n in whole if n.endswith(".bias") and n.rpartition(".")[0] in adapter.lora]
    embeddings = [m for m in adapter.lora if type(model.get_submodule(m)).__name__ == "Embedding"]
    if not (biased and embeddings):
        return []
    log.info("LoRA adapter: %d embedding(s) stored whole (modules_to_save) so that %d changed bias(es) can be "
             "lora_bias", len(embeddings), len(biased))
    for module in embeddings:
        del adapter.lora[module]
    return [f"{m}.weight" for m in embeddings]


def tied_to(model: nn.Module, module: str) -> list[str]:
    """The other modules sharing ``module``'s weight (an output head tied to the input embeddings)."""
    weight = getattr(model.get_submodule(module), "weight", None)
    return [name for name, m in model.named_modules()
            if weight is not None and name != module and getattr(m, "weight", None) is weight]


def add_tied(adapter: Adapter, model: nn.Module) -> None:
    """A LoRA module's tied partners get its factors too: peft adds a LoRA per module, so the tie alone would
    not carry the delta to the output head."""
    for module in list(adapter.lora):
        for other in tied_to(model, module):
            if type(model.get_submodule(other)).__name__ in LORA_MODULES:
                adapter.lora.setdefault(other, adapter.lora[module])


def add_whole(adapter: Adapter, folded: nn.Module, name: str, delta: torch.Tensor) -> None:
    """Tensor ``name`` stored exactly: the bias of a Linear / Conv1D LoRA target as ``lora_B``'s bias (peft's
    ``lora_bias``, which Embedding LoRA does not take), else with its whole module (``modules_to_save``) unless
    that module is, or holds, a LoRA target: then it is dropped."""
    module, _, leaf = name.rpartition(".")
    total = delta.square().sum().item()
    embedding = any(type(folded.get_submodule(m)).__name__ == "Embedding" for m in adapter.lora)
    if leaf == "bias" and module in adapter.lora and not embedding:
        adapter.bias[module], adapter.energy[name] = delta, (0.0, total)
    elif module and not any(t == module or t.startswith(f"{module}.") for t in adapter.lora):
        for stored in (module, *tied_to(folded, module)):  # peft copies each modules_to_save module: ties break
            state = folded.get_submodule(stored).state_dict()
            adapter.whole[stored] = {k: v.detach().clone() for k, v in state.items()}
        adapter.energy[name] = (0.0, total)
    else:
        adapter.dropped.append(name)
        adapter.energy[name] = (total, total)


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
            if adapter.bias:  # lora_bias is one switch for every module: zero where the bias did not change
                tensors[f"{PREFIX}{module}.lora_B.bias"] = adapter.bias.get(module, b.new_zeros(b.shape[0]))
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
                        lora_bias=bool(adapter.bias),
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
