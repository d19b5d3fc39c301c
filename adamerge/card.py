"""The model card (``README.md``) of a folded checkpoint: front matter the Hugging Face Hub reads, the
method with its paper, the experts, a summary of the learned coefficients and the test metrics.

``base_model`` in the front matter is the base exactly as the user named it when that is a hub id
(``org/name``); a local path means nothing on the Hub and is left out of the front matter. For an upload
(``hub.repo_id``) it follows the Hub's convention for merges instead: the list of every merged model given
as a hub id, the base first, then the experts.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from adamerge.kinship import CARD_ENTRIES

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
MOVED_SHOWN = 5  # tensors listed under "moved most"

PAPERS = {
    "Simple average": "https://arxiv.org/abs/2203.05482",
    "Task arithmetic": "https://arxiv.org/abs/2212.04089",
    "TIES-Merging": "https://arxiv.org/abs/2306.01708",
    "DARE": "https://arxiv.org/abs/2311.03099",
    "DELLA": "https://arxiv.org/abs/2406.11617",
    "Model Breadcrumbs": "https://arxiv.org/abs/2312.06795",
    "AdaMerging": "https://arxiv.org/abs/2310.02575",
    "AdaMerging++": "https://arxiv.org/abs/2310.02575",
    "aTLAS": "https://arxiv.org/abs/2407.02880",
    "Expert Merging": "https://arxiv.org/abs/2509.25712",
    "Expert Merging++": "https://arxiv.org/abs/2509.25712",
    "DAM": "https://arxiv.org/abs/2410.08371",
    "DOGE": "https://arxiv.org/abs/2501.01230",
    "WUDI-Merging": "https://arxiv.org/abs/2503.08099",
    "FW-Merging": "https://arxiv.org/abs/2503.12649",
    "Sens-Merging": "https://arxiv.org/abs/2502.12420",
    "TSV-M": "https://arxiv.org/abs/2412.00081",
    "ISO-C": "https://arxiv.org/abs/2502.04959",
    "ISO-CTS": "https://arxiv.org/abs/2502.04959",
    "Consensus merging": "https://arxiv.org/abs/2405.07813",
    "STAR": "https://arxiv.org/abs/2502.10339",
    "PCB-Merging": "https://arxiv.org/abs/2410.02396",
    "Model Stock": "https://arxiv.org/abs/2403.19522",
    "LiNeS": "https://arxiv.org/abs/2410.17146",
    "SLERP": "https://arxiv.org/abs/2403.13257",
    "RegMean": "https://arxiv.org/abs/2212.09849",
    "MaTS": "https://arxiv.org/abs/2312.04339",
    "Fisher merging": "https://arxiv.org/abs/2111.09832",
    "Concrete task arithmetic": "https://arxiv.org/abs/2312.06173",
    "Concrete AdaMerging": "https://arxiv.org/abs/2312.06173",
    "Evolutionary merging (CMA-ES)": "https://arxiv.org/abs/2403.13187",
}
CLOSED_FORMS = {"regmean": "RegMean", "mats": "MaTS", "fisher": "Fisher merging"}
STATIC_PREPROCESSING = {"ties": "TIES-Merging", "dare": "DARE", "della": "DELLA", "breadcrumbs": "Model Breadcrumbs",
                        "tsv": "TSV-M", "iso_c": "ISO-C", "iso_cts": "ISO-CTS", "consensus": "Consensus merging",
                        "star": "STAR", "pcb": "PCB-Merging", "model_stock": "Model Stock", "slerp": "SLERP"}


def hub_id(base: str | None) -> str | None:
    """``base`` if it names a Hub repository (``org/name``), None for a local path or an in-memory base."""
    if not base or Path(base).expanduser().exists() or base.startswith((".", "/", "~")):
        return None
    return base if HUB_ID.fullmatch(base) else None


def method_name(config: Mapping[str, Any]) -> str:
    """The method a resolved config amounts to (the README's method table read backwards)."""
    granularity, objective = config.get("granularity") or {}, (config.get("objective") or {}).get("name")
    steps = ((config.get("pool") or {}).get("preprocess") or {})
    preprocess = steps.get("method") or "none"
    then = [steps["then"]] if isinstance(steps.get("then"), str) else list(steps.get("then") or [])
    static = int((config.get("trainer") or {}).get("max_steps", 0)) == 0
    if ((config.get("search") or {}).get("name") or "none") != "none":
        return "Evolutionary merging (CMA-ES)"
    if objective == "projected":
        return "DOGE"
    if objective == "wudi":
        return "WUDI-Merging"
    closed_form = ((config.get("closed_form") or {}).get("method")) or "none"
    if static:
        if closed_form in CLOSED_FORMS:
            return CLOSED_FORMS[closed_form]
        if "consensus" in then:
            return "Consensus merging"
        if granularity.get("lines_beta") is not None:
            return "LiNeS"
        if granularity.get("init") == "sens":
            return "Sens-Merging"
        if preprocess in STATIC_PREPROCESSING:
            return STATIC_PREPROCESSING[preprocess]
        return "Simple average" if granularity.get("init") == "uniform" else "Task arithmetic"
    if (config.get("optim") or {}).get("name") == "frank_wolfe":
        return "FW-Merging"
    mask = granularity.get("mask")
    if mask not in (None, "none", False):  # a Concrete mask; the coefficients learn unless its steps take them all
        mask_steps = mask.get("steps") if isinstance(mask, Mapping) else None
        fixed = mask_steps is not None and mask_steps >= int((config.get("trainer") or {}).get("max_steps", 0))
        return "Concrete task arithmetic" if fixed else "Concrete AdaMerging"
    if objective == "dam":
        return "DAM"
    if objective == "align":
        return "Expert Merging++" if granularity.get("budget") or granularity.get("budget_per_tensor") \
            else "Expert Merging"
    if objective == "ce" or granularity.get("name") == "block":
        return "aTLAS"
    if objective == "entropy":
        return "AdaMerging++" if preprocess == "ties" else "AdaMerging"
    return f"learned merge ({objective} objective)"


def initial_values(init: Any, experts: Sequence[str]) -> torch.Tensor | None:
    """Each expert's starting coefficient (``granularity.init``), or None if it is not a plain number."""
    if init == "uniform":
        return torch.full((len(experts),), 1.0 / len(experts))
    if isinstance(init, Mapping):
        return torch.tensor([float(init[e]) for e in experts])
    return torch.full((len(experts),), float(init)) if isinstance(init, int | float) else None


def coefficient_summary(table: Mapping[str, torch.Tensor], experts: Sequence[str], init: Any = None) -> list[str]:
    """Markdown: mean/min/max per expert over every coefficient, and the tensors whose coefficients
    moved furthest from their initial value (mean |c - init| over experts and the tensor's coefficients)."""
    groups = {k: v.float() for k, v in table.items() if not k.startswith("delta.")}  # DOGE's deltas are no coefficients
    if not groups:
        return []
    flat = torch.cat([c.reshape(len(experts), -1) for c in groups.values()], 1)
    lines = ["| expert | mean | min | max |", "|---|---|---|---|"]
    lines += [f"| {e} | {flat[k].mean():.4f} | {flat[k].min():.4f} | {flat[k].max():.4f} |"
              for k, e in enumerate(experts)]
    start = initial_values(init, experts)
    if start is None or len(groups) < 2:
        return lines
    moved = {name: (c.reshape(len(experts), -1) - start[:, None]).abs().mean().item() for name, c in groups.items()}
    top = [name for name in sorted(moved, key=moved.get, reverse=True)[:MOVED_SHOWN] if moved[name] > 0]
    if top:
        lines += ["", "Tensors whose coefficients moved most from the start "
                  f"({', '.join(f'{e}={v:g}' for e, v in zip(experts, start.tolist(), strict=True))}):", "",
                  "| tensor | mean abs. change | " + " | ".join(experts) + " |", "|---" * (len(experts) + 2) + "|"]
        for name in top:
            per_expert = groups[name].reshape(len(experts), -1).mean(1)
            lines.append(f"| `{name}` | {moved[name]:.4f} | " + " | ".join(f"{v:.4f}" for v in per_expert) + " |")
    return lines


def model_card(
    base_model: str | None,
    experts: Mapping[str, str],
    details: Mapping[str, Any],
    metrics: Mapping[str, Mapping[str, float]] | None = None,
    coefficients: Mapping[str, torch.Tensor] | None = None,
    config: Mapping[str, Any] | None = None,
    merge_sources: Sequence[str] | None = None,
    adapter: Sequence[str] = (),
    library: str = "transformers",
    kinship: Sequence[str] = (),
    harness: Sequence[str] = (),
    model_index: Sequence[Mapping[str, Any]] = (),
) -> str:
    """Hugging Face model card with the merge front matter and a human-readable summary.

    ``merge_sources``: the base's and experts' sources as given; ``base_model`` then lists those that are
    hub ids (a Hub upload). ``adapter``: markdown about a LoRA adapter of the merge (``lora_output.card_section``);
    ``library``: ``peft`` when the directory holds the adapter alone. ``kinship``: the markdown table of
    ``kinship.merged_kinship`` (how alike the experts' task vectors are). ``harness``: markdown of the
    lm-evaluation-harness scores and ``model_index`` their Hub ``model-index`` entries (``harness.py``).
    """
    tags = ["adamerge", "merge", *(["lora", "peft"] if adapter else [])]
    if config:
        tags.append(re.sub(r"[^a-z0-9]+", "-", method_name(config).lower()).strip("-"))
    sources = list(dict.fromkeys(filter(None, map(hub_id, merge_sources or [base_model]))))
    front = {"base_model": (sources if merge_sources is not None else sources[0]) if sources else None,
             "base_model_relation": "merge", "tags": tags, "model-index": list(model_index) or None}
    front = {k: v for k, v in front.items() if v is not None}
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), f"library_name: {library}", "---", ""]
    lines += ["# Merged model", "", f"Merged with [adamerge](https://github.com/adamerge/adamerge) from "
              f"{len(experts)} expert(s) on top of `{base_model or 'an in-memory base'}`.", ""]
    if config:
        method = method_name(config)
        paper = f" ([paper]({PAPERS[method]}))" if method in PAPERS else ""
        lines += [f"Method: **{method}**{paper}.", ""]
    lines += ["| expert (task) | source |", "|---|---|"] + [f"| {k} | `{v}` |" for k, v in experts.items()]
    lines += ["", "## Merge", ""] + [f"- {k}: `{v}`" for k, v in details.items()]
    summary = coefficient_summary(coefficients or {}, list(experts), ((config or {}).get("granularity") or {})
                                  .get("init"))
    if summary:
        lines += ["", "## Learned coefficients", "", *summary]
    if adapter:
        lines += ["", "## LoRA adapter", "", *adapter]
    if kinship:
        lines += ["", "## Kinship of the experts", "", "Cosine similarity of each pair's task vectors as merged (after "
                  "any `pool.preprocess`) and the agreement of their signs where both change a parameter; low "
                  f"values mark experts that interfere (on at most {CARD_ENTRIES:,} evenly spaced entries per tensor; "
                  "`python -m adamerge inspect` reads every entry).", "", *kinship]
    if metrics:
        columns = sorted({c for row in metrics.values() for c in row})
        lines += ["", "## Metrics", "", "| model | " + " | ".join(columns) + " |",
                  "|---" * (len(columns) + 1) + "|"]
        for name, row in metrics.items():
            cells = [f"{row[c]:.4f}" if c in row else "" for c in columns]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if harness:
        lines += ["", "## lm-evaluation-harness", "", *harness]
    return "\n".join(lines) + "\n"
