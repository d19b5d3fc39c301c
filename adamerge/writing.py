"""A run's output: the folded checkpoint (or adapter) with its coefficients, config, card and metrics,
per-task heads, written atomically by ``export.save_folded``."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from adamerge.export import copy_tokenizer, save_folded
from adamerge.fingerprint import fingerprints
from adamerge.harness import harness_section, model_index
from adamerge.kinship import merged_kinship
from adamerge.loading import build_tokenizer, is_vision
from adamerge.lora_output import ADAPTER_DIR, build_adapter, card_section, output_options, write_adapter
from adamerge.merged import MergedModel
from adamerge.objectives.base import Objective
from adamerge.pool import ExpertPool
from adamerge.publish import hub_options
from adamerge.safetensors_io import save_layout


@dataclass
class RunResult:
    output_dir: Path | None
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    coefficients: dict[str, torch.Tensor] = field(default_factory=dict)
    fold_max_diff: float | None = None
    seconds: float = 0.0


def write_output(merged: MergedModel, pool: ExpertPool, objective: Objective, config: Mapping,
                 result: RunResult, protected: Mapping[str, Path] | None = None,
                 details: Mapping[str, Any] | None = None, folded: torch.nn.Module | None = None) -> None:
    """The folded checkpoint with its coefficients, config, card and metrics.json (atomic).

    ``folded``: the run's fold where it already made one (``merged.fold()``, for the fold check or the
    evaluation); it is what gets written, so the checked weights are the written ones. Without it the fold is
    written tensor by tensor (``MergedModel.folded_tensor``), never as a second model beside the base, except
    where a model is needed: per-task heads, experts' added tokens, an adapter output, a model whose tensors
    transformers converts on saving. With per-task heads, ``output_dir`` holds the merged backbone as a plain
    ``AutoModel`` checkpoint and ``tasks/<task>/`` one classifier per task. ``output.format=lora`` writes a PEFT
    adapter of the merge instead of the weights, ``both`` the full checkpoint and the adapter in ``adapter/``.
    """
    heads = len(merged.heads) > 0
    fmt, rank = output_options(config)
    by_tensor = (folded is None and not heads and fmt == "full" and merged.added is None
                 and save_layout(merged.base) is not None)
    if heads:
        folded = merged.fold().base_model
    elif folded is None and not by_tensor:
        folded = merged.fold()
    adapter = build_adapter(merged, folded, pool, rank) if fmt != "full" else None
    base_name = str(pool.base_source) if pool.base_source is not None else None

    def extra_files(tmp: Path) -> None:
        (tmp / "metrics.json").write_text(json.dumps(result.metrics, indent=2))
        if heads:
            write_task_heads(merged, pool, tmp)
        if is_vision(pool) and pool.base_source is not None:  # the base's image processor (text: its tokenizer)
            build_tokenizer(pool, pool.trust_remote_code).save_pretrained(tmp)
        if fmt == "both":
            write_adapter(adapter, merged.base, tmp / ADAPTER_DIR, base_name)

    granularity = merged.granularity
    if details is None:  # a refold passes the details of the run that learned the coefficients
        details = {"granularity": config["granularity"].get("name"), "space": granularity.space,
                   "transform": granularity.transform, "objective": config["objective"].get("name"),
                   "steps": (config.get("trainer") or {}).get("max_steps", 0),
                   "fold max |diff| (logits)": result.fold_max_diff}
        if heads:
            details["tasks"] = (getattr(merged.base, "heads_file", None)
                                or ", ".join(f"tasks/{t}" for t in merged.experts))
        search = config.get("search") or {}
        if search.get("name", "none") != "none":  # the coefficients come from a search, not from the steps
            details["search"] = (f"{search['name']}, fitness {search.get('fitness')} (subset {search.get('subset')}), "
                                 f"{search.get('max_evals')} evaluations")
        if granularity.mask is not None:
            details["mask"] = (f"Concrete, {granularity.mask.kind}: keeps {100 * granularity.mask.density():.1f}% of "
                               "the task vectors' elements")
    coefficients = {**result.coefficients, **granularity.state_tensors(), **objective.state_tensors()}
    save_folded(
        merged.base if by_tensor else folded, result.output_dir, base_source=pool.base_source,
        experts={k: "in-memory" if isinstance(v, torch.nn.Module) or callable(v) else str(v)
                 for k, v in pool.expert_sources.items()},
        coefficients=coefficients,
        coefficient_metadata={"experts": merged.experts, "granularity": config["granularity"],
                              "transform": granularity.transform, "space": granularity.space},
        config=config, details=details, metrics={k: v for k, v in result.metrics.items() if v and k != "harness"},
        overwrite=bool(config.get("overwrite")), trust_remote_code=bool(config["pool"].get("trust_remote_code")),
        extra_files=extra_files, protected=protected,
        record={"inputs": fingerprints(pool.base_source, pool.expert_sources)},
        weights=(lambda tmp: write_adapter(adapter, merged.base, tmp, base_name)) if fmt == "lora" else None,
        card={"adapter": card_section(adapter, fmt) if adapter else (), "library": "peft" if fmt == "lora" else
              "transformers", "merge_sources": merge_sources(pool) if hub_options(config) else None,
              "kinship": merged_kinship(merged), **harness_card(result, config)},
        tokenizer=pool.vocabulary.merged_tokenizer(), values=merged.folded_tensor if by_tensor else None,
    )


def write_task_heads(merged: MergedModel, pool: ExpertPool, into: Path) -> None:
    """Per-task heads in the task model's own compact form where it has one (``save_task_heads``: the
    zero-shot CLIP heads), else one complete classifier per task."""
    save_task_heads = getattr(merged.base, "save_task_heads", None)
    if save_task_heads is None:
        write_task_checkpoints(merged, pool, into)
        return
    heads = {}
    for task in merged.experts:
        with merged.task(task):
            heads[task] = merged.head_weights()
    save_task_heads(heads, merged.head_configs, into)


def write_task_checkpoints(merged: MergedModel, pool: ExpertPool, into: Path) -> None:
    """``tasks/<task>/``: merged backbone + that task's head and label names, a complete checkpoint each."""
    for task in merged.experts:
        merged.fold(task).save_pretrained(into / "tasks" / task)
        if pool.base_source is not None:
            copy_tokenizer(pool.base_source, into / "tasks" / task, pool.trust_remote_code,
                           pool.vocabulary.merged_tokenizer())


def harness_card(result: RunResult, config: Mapping) -> dict[str, Any]:
    """The card's lm-eval harness section and ``model-index`` (the merged model's scores, named as uploaded)."""
    scores, options = result.metrics.get("harness") or {}, (config.get("eval") or {}).get("harness") or {}
    if not scores:
        return {}
    name = (hub_options(config) or {}).get("repo_id") or result.output_dir.name
    return {"harness": harness_section(scores, options),
            "model_index": model_index(name, scores.get("after") or {}, options)}


def merge_sources(pool: ExpertPool) -> list[str]:
    """The base's and experts' sources as the user gave them (the card lists the hub ids among them)."""
    sources = [pool.base_source, *pool.expert_sources.values()]
    return [str(s) for s in sources if isinstance(s, (str, Path))]
