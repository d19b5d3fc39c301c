"""``adamerge plan <overrides>``: will it fit? Memory per device and on the host, before anything is downloaded.

The base is built from its ``config.json`` alone on the meta device (a hub id needs only that file in the
local cache; ``HF_HUB_OFFLINE=1`` works), LoRA experts are read from their ``adapter_config.json``, and
every figure follows the memory model of docs/ARCHITECTURE.md:

- base: its parameters in ``pool.dtype`` (else the config's dtype, as ``from_pretrained`` loads it);
- task vectors: ``K x numel`` per merged tensor in ``pool.tv_dtype``, or a LoRA tensor's factors
  ``(rows + cols) x sum of ranks``; in host memory under ``pool.offload=cpu`` (two stacks in transit on an
  accelerator); ``pool.shard=true`` divides them by the number of ranks on the device (each process still
  builds them whole in host memory first);
- one expert while loading (host), an upper bound: the task vectors are built one expert at a time, a module
  per expert only where one is needed (LoRA adapters, heads, other formats; else one tensor at a time);
- merged weights: every merged tensor in the base's dtype, alive for the step (the fold's copy after it;
  ``pool.shard=true``: gathered for the forwards, gathered again one at a time in backward), their gradients
  in backward when a step has several tasks (each task's graph uses every weight), plus the largest merge
  temporary;
- coefficients: ``K x n`` fp32 with their gradient and Adam's two moments when training;
- teacher cache (``objective=align|dam`` with ``teacher=cached``): per scored position ``top_k`` fp32
  log-probabilities and int64 ids, the chosen hidden states, and the row's token ids (an upper bound);
- activations: what backward keeps for every task's batch of a step (all tasks' graphs live until backward);
- DOGE (``objective=projected``): its fp32 deltas with Adam's state, masks and subspace bases;
- WUDI (``objective=wudi``): its fp32 merged deltas with Adam's state and the experts' Gram matrices;
- closed-form statistics (``closed_form.method``): RegMean's / MaTS's Gram matrices (``2 sum in^2`` fp32) and
  per-expert products, or Fisher merging's per-expert Fishers (``closed_form_state``).

A CLIP zero-shot pool (``pool.zeroshot``) is planned as the vision classifier the run merges.

On a CPU run the device is the host: the peak is the larger of loading and training.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adamerge.errors import AdamergeError
from adamerge.granularity import GRANULARITIES, Block, Granularity
from adamerge.options import construct, parse_dtype, parse_offload
from adamerge.pool import DEFAULT_HEADS, is_adapter, is_local, resolve_auto_class
from adamerge.tensors import TensorInfo, describe_tensor, is_input_first, linear_layers

UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
LORA_LAYERS = {"Linear", "Embedding", "Conv1D"}  # what adamerge keeps as factors (pool.unload_lora)
OPTIMIZER_STATES = 2  # Adam/AdamW: exp_avg and exp_avg_sq per coefficient
# Tensors that backward keeps per layer and token of a decoder layer, in units of the hidden size H and the
# MLP width I: attention inputs/outputs, norms and residuals ~10 H, a gated MLP's gate, up, act, product ~4 I.
# Estimate / saved tensors of one step (eval mode, batch 4 x 64 tokens): Llama 1.01, GPT-2 0.89, BERT 1.55;
# the zoo's step within a factor of 2 in tests/test_plan.py. Dropout masks (train-mode objectives) are extra.
LAYER_ACTIVATIONS_H, LAYER_ACTIVATIONS_I = 10, 4
LOGIT_COPIES = 3  # the scored logits in fp32: log_softmax, its exp, the product (entropy / KL)


def parse_size(value: Any, key: str = "plan.device_memory") -> int | None:
    """``80GB`` (10^9), ``24GiB`` (2^30), ``512MiB``, ``1e9`` bytes; null means no limit."""
    if value is None or isinstance(value, (int, float)) and not isinstance(value, bool):
        return None if value is None else int(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", str(value).lower())
    if not match or match.group(2) not in ("", *UNITS):
        raise AdamergeError(f"{key}={value!r} is not a size; write e.g. 80GB, 24GiB or 512MiB")
    return int(float(match.group(1)) * UNITS.get(match.group(2) or "b"))


def human(n: float) -> str:
    """Bytes in binary units, three significant digits."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"


# ---- the base from its config, on the meta device -----------------------------------------------------------

def base_config(source: str | Path, trust_remote_code: bool = False):
    """The base's ``config.json``: a local directory's, or a hub id's from the local cache (or the hub)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(source), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = "" if is_local(source) else " (a hub id: its config.json must be cached, or the hub reachable)"
        raise AdamergeError(f"plan: no config for the base {str(source)!r}{where}: {first}") from e


def meta_base(pool_cfg: Mapping) -> nn.Module:
    """The base architecture with no weights: parameters on the meta device in the dtype a run loads."""
    source = pool_cfg.get("base")
    if isinstance(source, nn.Module):
        return source
    if not isinstance(source, (str, Path)) or not source:
        raise AdamergeError("pool.base is not set: pool.base=DIR_OR_HUB_ID")
    if is_local(source) and not Path(str(source)).expanduser().exists():
        raise AdamergeError(f"base: path {str(source)!r} does not exist")
    trust = bool(pool_cfg.get("trust_remote_code"))
    config = base_config(source, trust)
    dtype = parse_dtype(pool_cfg.get("dtype"), "pool.dtype") or config_dtype(config)
    if pool_cfg.get("zeroshot"):
        return zeroshot_classifier(config, pool_cfg, dtype)
    auto_class = resolve_auto_class(pool_cfg.get("auto_class", "AutoModelForCausalLM"))
    with torch.device("meta"):
        return auto_class.from_config(config, dtype=dtype, trust_remote_code=trust)


def zeroshot_classifier(config, pool_cfg: Mapping, dtype: torch.dtype) -> nn.Module:
    """``pool.zeroshot``: what the run merges is CLIP's vision tower inside a zero-shot classifier
    (``adamerge.zeroshot``), not the whole CLIP; its head has the first task's classes."""
    from transformers import CLIPVisionConfig

    from adamerge.zeroshot import CLIPZeroShotClassifier

    first = next(iter(pool_cfg.get("experts") or {}), None)
    classes = ((pool_cfg["zeroshot"].get("classnames") or {}).get(first)) or ["class"]
    vision = CLIPVisionConfig(**{**config.vision_config.to_dict(), "projection_dim": config.projection_dim,
                                 "id2label": dict(enumerate(classes))})
    with torch.device("meta"):
        return CLIPZeroShotClassifier(vision).to(dtype)


def config_dtype(config) -> torch.dtype:
    """The dtype ``from_pretrained`` loads without ``dtype=`` (``"auto"``: the config's, else float32)."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def merged_names(model: nn.Module, pool_cfg: Mapping) -> list[str]:
    """The parameters a run merges: floating point, matching include and no exclude, heads left out
    (``ExpertPool``'s selection; tied copies appear once)."""
    include, exclude = pool_cfg.get("include") or (), pool_cfg.get("exclude") or ()
    heads = pool_cfg.get("heads")
    if heads is None:
        auto = str(pool_cfg.get("auto_class", "AutoModelForCausalLM"))
        heads = DEFAULT_HEADS if "Classification" in auto else ()
    return [n for n, p in model.named_parameters() if p.is_floating_point()
            and (not include or any(re.search(rx, n) for rx in include))
            and not any(re.search(rx, n) for rx in exclude) and not any(re.search(rx, n) for rx in heads)]


# ---- what each expert changes: full (every merged tensor) or a LoRA adapter (its targets) -------------------

@dataclass
class ExpertChanges:
    """One expert's changes: dense tensors (``None``: every merged tensor) and LoRA ranks per weight."""

    dense: set[str] | None = None
    ranks: dict[str, int] = field(default_factory=dict)


def matches(name: str, keys: str | Sequence[str] | None) -> bool:
    """peft's target matching: a regex over the whole name, or names equal to or ending in ``.key``."""
    if not keys:
        return False
    if isinstance(keys, str):
        return keys == "all-linear" or re.fullmatch(keys, name) is not None
    return any(name == k or name.endswith(f".{k}") for k in keys)


def adapter_changes(model: nn.Module, path: Path, names: Sequence[str]) -> ExpertChanges:
    """What a PEFT LoRA adapter changes, from its ``adapter_config.json`` alone: factors of each targeted
    Linear/Embedding/Conv1D weight (rank ``r`` or its ``rank_pattern``), dense tensors for DoRA and
    ``lora_bias`` (peft merges those), ``modules_to_save`` and trained biases."""
    try:
        adapter = json.loads((path / "adapter_config.json").read_text())
    except (OSError, ValueError) as e:
        raise AdamergeError(f"plan: {str(path / 'adapter_config.json')!r} is not valid JSON") from e
    targets, excluded = adapter.get("target_modules"), adapter.get("exclude_modules")
    ranks, r = adapter.get("rank_pattern") or {}, int(adapter.get("r") or 8)
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    targeted = {}
    for module_name, module in model.named_modules():
        if type(module).__name__ not in LORA_LAYERS or not matches(module_name, targets) or matches(module_name,
                                                                                                    excluded):
            continue
        if targets == "all-linear" and module is output:  # peft leaves the output layer out
            continue
        targeted[f"{module_name}.weight"] = next((int(v) for k, v in ranks.items()
                                                  if re.match(rf"(.*\.)?{k}$", module_name)), r)
    changes = ExpertChanges(dense=set())
    if adapter.get("use_dora") or adapter.get("lora_bias"):
        changes.dense.update(targeted)
    else:
        changes.ranks = targeted
    saved = adapter.get("modules_to_save") or ()
    bias = adapter.get("bias", "none")
    for n in names:
        module_name = n.rpartition(".")[0]
        trained_bias = n.endswith(".bias") and (bias == "all" or bias == "lora_only" and f"{module_name}.weight"
                                                in targeted)
        if matches(module_name, saved) or trained_bias:
            changes.dense.add(n)
    return changes


def expert_changes(model: nn.Module, sources: Mapping[str, Any], names: Sequence[str]) -> dict[str, ExpertChanges]:
    return {e: adapter_changes(model, Path(s).expanduser(), names) if is_adapter(s) else ExpertChanges()
            for e, s in sources.items()}


# ---- coefficients ------------------------------------------------------------------------------------------

def build_granularity(gran_cfg: Mapping) -> tuple[Granularity, int | None]:
    """The configured granularity (Expert Merging++'s budget set aside: its counts come from stage 1)."""
    options = {k: v for k, v in gran_cfg.items() if k not in ("budget", "stage1_steps", "budget_per_tensor")}
    return construct(GRANULARITIES, "granularity", options or {"name": "layer"}), gran_cfg.get("budget") or None


def coefficient_count(granularity: Granularity, infos: Sequence[TensorInfo], budget: int | None,
                      per_tensor: float | None = None) -> int:
    """Coefficients per expert, as ``Granularity.setup`` creates them (one group per key)."""
    if per_tensor and not budget:
        budget = round(float(per_tensor) * len(infos))
    if budget:
        return int(budget)
    groups = {granularity.group(i): granularity.count(i) for i in infos}
    return sum(groups.values())


def keeps_factors(granularity: Granularity, info: TensorInfo, num_experts: int) -> bool:
    """LoRA factors serve where coefficients are constant along rows or columns (``merged.fits_factors``)."""
    if (isinstance(granularity, Block) and granularity.random) or granularity.mask is not None:
        return False
    coef = torch.zeros(num_experts, granularity.count(info), device="meta")
    shape = granularity.expand(coef, info).shape
    return shape[1] == 1 or shape[2] == 1


# ---- the plan ----------------------------------------------------------------------------------------------

def vector_layout(params: Mapping[str, torch.Tensor], infos: Mapping[str, TensorInfo],
                  changes: Mapping[str, ExpertChanges], granularity: Granularity, preprocess: bool
                  ) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
    """Elements of each dense stack (``K x numel``), of each tensor's LoRA factors (``(rows + cols) x ranks``),
    and those summed ranks, as ``ExpertPool.task_vectors`` and ``MergedModel`` lay them out: factors only where
    every expert changing a tensor is LoRA and neither preprocessing nor the granularity needs dense values."""
    k = len(changes)
    dense, factors, ranks_of = {}, {}, {}
    for n, info in infos.items():
        full = [e for e, c in changes.items() if c.dense is None or n in c.dense]
        lora = [c.ranks[n] for c in changes.values() if n in c.ranks]
        if not full and not lora:
            continue  # no expert changes it: no task vector
        if full or preprocess or not keeps_factors(granularity, info, k):
            dense[n] = k * params[n].numel()
        else:
            factors[n], ranks_of[n] = sum(lora) * sum(params[n].shape[:2]), sum(lora)
    return dense, factors, ranks_of


@dataclass(frozen=True)
class Line:
    component: str
    device: int  # bytes per rank while training
    host: int  # bytes per node while loading (CPU runs: the loading phase)
    note: str = ""


@dataclass
class Plan:
    settings: dict[str, str]
    lines: list[Line]
    accelerator: str  # "cpu": the device is the host
    processes: int  # per node: one per device
    device_memory: int | None
    host_memory: int | None
    parts: dict[str, int] = field(default_factory=dict)  # named exact figures the tests check

    @property
    def device_total(self) -> int:
        return sum(line.device for line in self.lines)

    @property
    def host_total(self) -> int:
        return sum(line.host for line in self.lines)

    @property
    def peak(self) -> int:
        """Per rank on an accelerator; on a CPU run, per node, the larger of loading and training (both host memory)."""
        if self.accelerator == "cpu":  # per node: every process's training memory, or everything loaded
            return max(self.processes * self.device_total, self.host_total)
        return self.device_total

    @property
    def fits(self) -> bool | None:
        checks = [self.peak <= self.device_memory] if self.device_memory else []
        if self.host_memory:
            checks.append(self.host_total <= self.host_memory)
        return all(checks) if checks else None

    def verdict(self) -> str:
        if self.fits is None:
            return "no limit set (plan.device_memory)"
        limits = [f"{human(x)} {what}" for x, what in ((self.device_memory, "device"), (self.host_memory, "host"))
                  if x]
        return ("fits " if self.fits else "does NOT fit ") + " and ".join(limits)

    def summary(self) -> str:
        s = self.settings
        where = "per rank (cpu: host memory)" if self.accelerator == "cpu" else f"per rank ({self.accelerator})"
        return (f"plan: K={s['K']}, {s['dtype']}, {s['granularity']}, {s['objective']}, {s['data']}: peak "
                f"{human(self.peak)} {where}, host {human(self.host_total)} while loading; {self.verdict()}")

    def table(self) -> str:
        rows = [("component", "device / rank", "host / node", "note"), ("---", "---:", "---:", "---")]
        rows += [(x.component, human(x.device), human(x.host), x.note) for x in self.lines]
        rows.append(("total", human(self.device_total), human(self.host_total),
                     "cpu: the device is the host; peak = the larger total" if self.accelerator == "cpu" else ""))
        settings = "\n".join(f"  {k}: {v}" for k, v in self.settings.items())
        body = "\n".join("| " + " | ".join(r) + " |" for r in rows)
        return f"{settings}\n\n{body}\n\n{self.summary()}"


def world_size(trainer_cfg: Mapping) -> tuple[int, int]:
    """(devices per node, nodes) from ``trainer.devices`` / ``trainer.num_nodes`` (``auto``: the GPUs seen)."""
    devices = trainer_cfg.get("devices", 1)
    if isinstance(devices, (list, tuple)):
        devices = len(devices)
    elif devices in ("auto", -1, "-1"):
        devices = max(torch.cuda.device_count(), 1)
    return int(devices), int(trainer_cfg.get("num_nodes", 1) or 1)


def accelerator_of(trainer_cfg: Mapping) -> str:
    name = str(trainer_cfg.get("accelerator", "auto"))
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if name == "gpu" else name


def task_rows(data_cfg: Mapping, tasks: Sequence[str], rows: Mapping[str, int] | None) -> int | None:
    """Calibration examples over all tasks: given, or counted in local JSONL files (``data.limit`` applied)."""
    if rows is not None:
        return sum(rows.values())
    limit, total = data_cfg.get("limit"), 0
    for task in tasks:
        source = (data_cfg.get("paths") or {}).get(task)
        path = Path(str(source)).expanduser() if isinstance(source, (str, Path)) else None
        if path is None or not path.is_file():
            if not limit:
                return None
            total += int(limit)
            continue
        count = sum(1 for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip())
        total += min(count, limit) if limit else count
    return total


def make_plan(config: Mapping, rows: Mapping[str, int] | None = None, base: nn.Module | None = None) -> Plan:
    """The plan of a resolved run config. ``rows``: calibration examples per task, when already read;
    ``base``: the loaded base, when there is one (else it is built on the meta device)."""
    pool_cfg, data_cfg = config.get("pool") or {}, config.get("data") or {}
    trainer_cfg, obj_cfg = config.get("trainer") or {}, config.get("objective") or {"name": "entropy"}
    plan_cfg = config.get("plan") or {}
    model = base if base is not None else meta_base(pool_cfg)
    params = dict(model.named_parameters())
    names = merged_names(model, pool_cfg)
    experts = dict(pool_cfg.get("experts") or {})
    k = len(experts)
    if k < 1:
        raise AdamergeError("the pool needs at least one expert: set pool.experts.NAME=DIR_OR_ID")
    base_dtype = next(iter(params.values())).dtype
    tv_dtype = parse_dtype(pool_cfg.get("tv_dtype"), "pool.tv_dtype")
    offload, shard = parse_offload(pool_cfg.get("offload")), bool(pool_cfg.get("shard"))
    devices, nodes = world_size(trainer_cfg)
    ranks = devices * nodes
    split = ranks if shard else 1
    accelerator = accelerator_of(trainer_cfg)
    steps = int(trainer_cfg.get("max_steps", 0))
    granularity, budget = build_granularity(config.get("granularity") or {})
    preprocess = ((pool_cfg.get("preprocess") or {}).get("method") or "none") != "none"

    infos = {n: describe_tensor(model, n, params[n]) for n in names}
    dense, factors, ranks_of = vector_layout(params, infos, expert_changes(model, experts, names), granularity,
                                             preprocess)
    tv_size = (tv_dtype or base_dtype).itemsize
    stack_bytes = tv_size * sum(dense.values())
    factor_bytes = tv_size * sum(factors.values()) + 8 * sum(ranks_of.values())  # + the int64 owner per rank slot
    vector_names = [*dense, *factors]

    base_bytes = sum(p.numel() * p.element_size() for p in params.values())
    buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
    merged_bytes = sum(params[n].numel() * params[n].element_size() for n in vector_names)
    largest = max((params[n].numel() for n in vector_names), default=0)
    gemv = all(granularity.count(infos[n]) == 1 for n in vector_names)  # one scalar per expert: no (K, *shape)
    temporary = (k if dense and not gemv else 1) * largest * 4  # (coef * stack) in fp32, else one fp32 delta

    on_device_stacks = stack_bytes // split
    if offload:
        on_device_stacks = 0 if accelerator == "cpu" else 2 * k * tv_size * max(
            (params[n].numel() for n in dense), default=0)
    built_on_host = not pool_cfg.get("device") or pool_cfg["device"] == "cpu"  # pool.device: where they are built
    host_stacks = stack_bytes if offload or built_on_host else 0  # sharded too: each process builds them whole
    expert_bytes = base_bytes  # a full expert, or a LoRA adapter on a private copy of the base
    device_base = base_bytes + buffer_bytes
    merged_device = merged_bytes
    # With two or more tasks per step every merged weight is used by each task's graph: backward holds its
    # accumulating gradient until the last task's contribution, so all of them are alive at once.
    tasks = [t for t in experts if t in (data_cfg.get("paths") or {})] or list(experts)
    gradients = merged_device if steps > 0 and len(tasks) > 1 else 0

    n_coef = coefficient_count(granularity, [infos[n] for n in vector_names], budget,
                               (config.get("granularity") or {}).get("budget_per_tensor"))
    coef_bytes = 4 * k * n_coef * ((2 + OPTIMIZER_STATES) if steps > 0 else 1)
    if isinstance(granularity, Block) and granularity.random:  # one partition mask per tensor shape
        masks = {tuple(infos[n].shape): math.prod(infos[n].shape) for n in vector_names}
        coef_bytes += sum(masks.values()) * (1 if granularity.partitions <= 256 else 4)
    mask_logits = 0  # a Concrete mask (adamerge.masks): one fp32 logit per element, K of them per_task, trained
    if granularity.mask is not None:
        rows = 1 if granularity.mask.kind == "shared" else k
        mask_logits = rows * sum(math.prod(infos[n].shape) for n in vector_names)
        coef_bytes += 4 * mask_logits * ((2 + OPTIMIZER_STATES) if steps > 0 else 1)

    cache, cache_note = teacher_cache(model, obj_cfg, data_cfg, tasks, rows, steps)
    acts, act_note = activations(model, obj_cfg, data_cfg, len(tasks), steps, bool(config.get("recompute")))
    matrices = {n: tuple(params[n].shape) for n in vector_names if params[n].dim() == 2}
    if obj_cfg.get("name") == "projected" and steps > 0:
        acts, act_note = doge_activations(matrices, k, tv_dtype or base_dtype)
    doge, doge_note = doge_state(obj_cfg, matrices, k, steps)
    wudi, wudi_note = wudi_state(obj_cfg, matrices, k, steps)
    if wudi:
        acts, act_note = wudi_activations(matrices)
    closed_device, closed_host, closed_note = closed_form_state(model, params, vector_names, config.get("closed_form"),
                                                                k, offload or built_on_host)
    ddp = f"{ranks} ranks, each with all of them" if ranks > 1 and not shard else ""
    per_node = devices  # one process per device, each loading its own copy (host column: per node)
    lines = [
        Line("base", device_base if accelerator != "cpu" else base_bytes + buffer_bytes,
             per_node * (base_bytes + buffer_bytes),
             f"{sum(p.numel() for p in params.values()):,} parameters in {str(base_dtype).replace('torch.', '')}"),
        Line("task vectors", on_device_stacks + factor_bytes,
             per_node * (host_stacks + (factor_bytes if built_on_host else 0)),
             stack_note(dense, factors, ranks_of, k, tv_dtype or base_dtype, offload, accelerator, shard, split, ddp)),
        Line("one expert while loading", 0, per_node * expert_bytes,
             "at most: an expert built as a module (safetensors experts of the base's type: one tensor at a time)"),
        Line("merged weights", merged_device + gradients + temporary, 0,
             f"{len(vector_names)} tensors in {str(base_dtype).replace('torch.', '')} for the step (the fold's "
             f"copy after it)" + (", their gradients in backward" if gradients else "")
             + f" + {human(temporary)} merge temporary"
             + ("; gathered from the ranks' rows, again one at a time in backward" if shard else "")),
        Line("coefficients + optimizer", coef_bytes, 0,
             f"{k} x {n_coef:,} fp32" + (f" + {mask_logits:,} mask logits" if mask_logits else "")
             + (" + grad + Adam's 2 moments" if steps > 0 else " (no training)")),
        Line("teacher cache", cache, 0, cache_note),
        *([Line("DOGE deltas, masks, subspaces", doge, 0, doge_note)] if doge else []),
        *([Line("WUDI merged deltas, Gram matrices", wudi, 0, wudi_note)] if wudi else []),
        *([Line("closed-form statistics", closed_device, per_node * closed_host, closed_note)] if closed_note else []),
        Line("activations", acts, 0, act_note),
    ]
    objective = str(obj_cfg.get("name", "entropy"))
    if objective in ("align", "dam"):
        objective += f" ({obj_cfg.get('teacher', 'cached' if objective == 'align' else 'online')} teacher)"
    settings = {
        "K": str(k), "dtype": f"{str(base_dtype).replace('torch.', '')} (tv {str(tv_dtype or base_dtype)[6:]})",
        "granularity": f"{(config.get('granularity') or {}).get('name', 'layer')} ({n_coef:,} coefficients/expert)",
        "objective": objective,
        "data": f"batch {data_cfg.get('batch_size', 8)} x {data_cfg.get('max_length', 512)} tokens x "
                f"{len(tasks)} tasks, {steps} steps",
        "offload": "cpu" if offload else "none",
        "sharding": f"pool.shard={str(shard).lower()}, {devices} device(s) x {nodes} node(s), {accelerator}",
    }
    parts = {"base": base_bytes, "stacks": stack_bytes, "factors": factor_bytes, "merged": merged_bytes,
             "coefficients": k * n_coef, "mask_logits": mask_logits, "teacher_cache": cache, "activations": acts,
             "closed_form": closed_device + closed_host}
    return Plan(settings, lines, accelerator, per_node, parse_size(plan_cfg.get("device_memory")),
                parse_size(plan_cfg.get("host_memory"), "plan.host_memory"), parts)


def closed_form_state(model: nn.Module, params: Mapping[str, torch.Tensor], names: Sequence[str],
                      cfg: Mapping | None, k: int, beside_on_host: bool) -> tuple[int, int, str]:
    """(device, host) bytes of ``closed_form``'s statistics, gathered before training (adamerge/closed_form.py):
    RegMean / MaTS hold one expert's Gram matrices and their running sum (``2 sum in^2`` fp32 over the
    Linear / Conv1D weights) on the device and each expert's ``G~_k tau_k`` (fp32) beside the task vectors;
    Fisher merging one fp32 Fisher and gradient on the device and each expert's Fisher beside the task vectors."""
    method = (cfg or {}).get("method") or "none"
    if method in ("regmean", "mats"):
        layers = linear_layers(model, names)
        grams = sum(params[n].shape[0 if is_input_first(m) else 1] ** 2 for n, m in layers.items())
        products = sum(params[n].numel() for n in layers)
        device, beside = 4 * 2 * grams, 4 * k * products
        note = (f"{len(layers)} Linear/Conv1D weights: one expert's Gram matrices and their sum (2 x {grams:,} fp32), "
                f"each expert's G tau ({k} x {products:,} fp32)")
    elif method == "fisher":
        n = sum(params[name].numel() for name in names)
        device, beside = 4 * 2 * n, 4 * k * n
        note = f"one expert's Fisher and gradient (2 x {n:,} fp32), each expert's Fisher ({k} x {n:,} fp32)"
    else:
        return 0, 0, ""
    where = "; the per-expert part in host memory" if beside_on_host else ""
    return device + (0 if beside_on_host else beside), beside if beside_on_host else 0, note + where


def stack_note(dense: Mapping[str, int], factors: Mapping[str, int], ranks_of: Mapping[str, int], k: int,
               dtype: torch.dtype, offload: bool, accelerator: str, shard: bool, split: int, ddp: str) -> str:
    parts = [f"{len(dense)} stacks of K={k} in {str(dtype)[6:]}"] if dense else []
    if factors:
        low, high = min(ranks_of.values()), max(ranks_of.values())
        parts.append(f"{len(factors)} LoRA tensors as factors (rank {low if low == high else f'{low}-{high}'} "
                     "summed over experts)")
    if offload and dense:  # LoRA factors stay on the device
        parts.append("stacks in host memory, streamed" + ("" if accelerator == "cpu" else " (2 stacks in transit)"))
    if shard:
        parts.append(f"1/{split} per rank")
    if ddp:
        parts.append(ddp)
    return "; ".join(parts) or "no expert changes a merged tensor"


def scored_positions(obj_cfg: Mapping, data_cfg: Mapping) -> tuple[int, int]:
    """(scored positions per row, tokens per row): ``last`` 1, ``generated`` the continuation, ``all`` the row."""
    positions, length = obj_cfg.get("positions", "last"), int(data_cfg.get("max_length", 512))
    new = int(obj_cfg.get("new_tokens", 8))
    if positions == "generated":
        return new, length + new
    return (length if positions == "all" else 1), length


@dataclass(frozen=True)
class Dims:
    """What activations and a teacher cache scale with, read from a transformers config (0 where it has none,
    e.g. a CLIP wrapper: those estimates are then 0)."""

    hidden: int
    mlp: int
    layers: int
    width: int  # logits per position: the vocabulary, or a classifier's labels
    classifier: bool  # one row of logits per example, not one per token


def dims_of(model: nn.Module) -> Dims:
    config = getattr(model, "config", None)
    h = int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0) or 0)
    classifier = "Classif" in type(model).__name__  # *ForSequenceClassification, CLIPZeroShotClassifier
    return Dims(h, int(getattr(config, "intermediate_size", 0) or getattr(config, "n_inner", 0) or 4 * h),
                int(getattr(config, "num_hidden_layers", 0) or getattr(config, "n_layer", 0) or 0),
                int(getattr(config, "num_labels" if classifier else "vocab_size", 0) or 0), classifier)


def teacher_cache(model: nn.Module, obj_cfg: Mapping, data_cfg: Mapping, tasks: Sequence[str],
                  rows: Mapping[str, int] | None, steps: int) -> tuple[int, str]:
    """Align/DAM with ``teacher=cached``: kept on the device for the whole run (``objectives/align.py``)."""
    name = obj_cfg.get("name", "entropy")
    teacher = obj_cfg.get("teacher", "cached" if name == "align" else "online")
    if name not in ("align", "dam") or teacher != "cached" or steps <= 0:
        return 0, "none (no cached teacher)" if name in ("align", "dam") else f"none ({name} has no teacher)"
    examples = task_rows(data_cfg, tasks, rows)
    dims = dims_of(model)
    n, length = (1, 0) if dims.classifier else scored_positions(obj_cfg, data_cfg)
    top = min(int(obj_cfg.get("top_k") or dims.width), dims.width)
    hidden_weight = 0.0 if name == "dam" else float(obj_cfg.get("hidden_weight", 1.0))
    layers = len(obj_cfg.get("hidden_layers") or [0]) if hidden_weight > 0 else 0
    dtype_size = next(model.parameters()).element_size()
    per_example = n * top * (4 + 8) + layers * n * dims.hidden * dtype_size + 8 * length
    if examples is None:
        return 0, f"{human(per_example)} per example (set data.limit to count them)"
    hidden = f" + {layers} hidden layer(s)" if layers else ""
    return examples * per_example, f"{examples} examples x {n} positions x top-{top}{hidden} (on the device)"


def activations(model: nn.Module, obj_cfg: Mapping, data_cfg: Mapping, tasks: int, steps: int,
                recompute: bool) -> tuple[int, str]:
    """What backward keeps for one step: every task's batch (their graphs live until backward), each
    ``layers x tokens x (10 H + 4 I)`` plus the logits and the scored logits in fp32; with ``recompute``
    one batch at a time. Without training, one batch forward (the fold check)."""
    dims = dims_of(model)
    h, i, layers, width = dims.hidden, dims.mlp, dims.layers, dims.width
    size = next(model.parameters()).element_size()
    batch = int(data_cfg.get("batch_size", 8))
    scored, length = scored_positions(obj_cfg, data_cfg)
    config = getattr(model, "config", None)
    if getattr(config, "image_size", None) and getattr(config, "patch_size", None):  # a ViT: patches + [CLS]
        scored, length = 1, (config.image_size // config.patch_size) ** 2 + 1
    logit_rows = 1 if dims.classifier else length
    per_batch = batch * (length * layers * (LAYER_ACTIVATIONS_H * h + LAYER_ACTIVATIONS_I * i) + logit_rows * width)
    per_batch = per_batch * size + batch * scored * width * 4 * LOGIT_COPIES
    if steps <= 0:
        return batch * length * (max(h, i) + width) * size, f"one batch forward without grad ({batch} x {length})"
    live = 1 if recompute else tasks
    return live * per_batch, (f"{live} batch(es) of {batch} x {length} tokens, {layers} layers "
                              + ("(recompute)" if recompute else "alive until backward"))


def doge_state(obj_cfg: Mapping, matrices: Mapping[str, tuple[int, int]], k: int, steps: int) -> tuple[int, str]:
    """``objective=projected`` (DOGE, ``objectives/projected.py``): per merged matrix a trainable fp32 delta (with
    its gradient and Adam's two moments), a bool mask per expert (``mask_density``) and the SVD basis of the
    shared subspace (its whole ``U``, which the kept columns view)."""
    if obj_cfg.get("name") != "projected" or steps <= 0:
        return 0, ""
    numel = sum(rows * cols for rows, cols in matrices.values())
    masks = k * numel if obj_cfg.get("mask_density") is not None else 0
    bases = sum(4 * rows * min(rows, k * max(min(rows, cols) // k, 1)) for rows, cols in matrices.values())
    return 4 * (2 + OPTIMIZER_STATES) * numel + masks + bases, (
        f"{len(matrices)} matrices: fp32 delta + grad + Adam's 2 moments" + (", K bool masks" if masks else "")
        + ", shared-subspace bases")


def doge_activations(matrices: Mapping[str, tuple[int, int]], k: int, tv_dtype: torch.dtype) -> tuple[int, str]:
    """DOGE's loss runs no model. Only the deltas need gradients, so backward keeps just ``(K, rows)`` per
    matrix; the forward's fp32 ``(K, rows, cols)`` temporaries (adjusted stack, gap, the fp32 copy of a
    reduced-precision stack) exist for one matrix at a time."""
    copies = 2 if tv_dtype == torch.float32 else 3
    kept = sum(4 * k * rows for rows, _ in matrices.values())
    largest = max((rows * cols for rows, cols in matrices.values()), default=0)
    return kept + copies * 4 * k * largest, f"(K, rows) per matrix + {copies} fp32 stacks of the largest (no model)"


def wudi_state(obj_cfg: Mapping, matrices: Mapping[str, tuple[int, int]], k: int, steps: int) -> tuple[int, str]:
    """``objective=wudi`` (``objectives/wudi.py``): per matrix a trainable fp32 merged delta with its gradient,
    Adam's two moments and the gradient its loss keeps from forward, and where a matrix has fewer columns than
    rows the experts' ``(cols, cols)`` Gram matrices (``objective.exclude`` is not subtracted: an upper bound)."""
    if obj_cfg.get("name") != "wudi" or steps <= 0:
        return 0, ""
    numel = sum(rows * cols for rows, cols in matrices.values())
    grams = sum(4 * k * cols * cols for rows, cols in matrices.values() if cols < rows)
    return 4 * (3 + OPTIMIZER_STATES) * numel + grams, (
        f"{len(matrices)} matrices: fp32 merged delta + grad + Adam's 2 moments + kept grad, K Gram matrices")


def wudi_activations(matrices: Mapping[str, tuple[int, int]]) -> tuple[int, str]:
    """WUDI's loss runs no model and builds its gradient itself, one expert at a time: fp32 temporaries of one
    expert's largest matrix (its copy, the gap, the product, and a ``(rows, rows)`` one where no Gram is read)."""
    largest = max((rows * cols + (rows * rows if cols >= rows else 0) for rows, cols in matrices.values()), default=0)
    return 4 * 3 * largest, "one expert's fp32 temporaries of the largest matrix (no model)"


def plan_line(config: Mapping, rows: Mapping[str, Sequence] | None = None, base: nn.Module | None = None) -> str:
    """The one-line plan a run logs before it loads anything (``base``: a pool's, when passed in). It never stops
    the run: a base given as a builder has no config to read, and input errors are the run's to report."""
    source = (config.get("pool") or {}).get("base")
    if base is None and not isinstance(source, (str, Path, nn.Module)):
        return "plan: skipped (pool.base is a builder: there is no config to read before it runs)"
    try:
        return make_plan(config, {t: len(r) for t, r in rows.items()} if rows else None, base).summary()
    except AdamergeError as e:
        return f"plan: not available ({e})"


# ---- the command -------------------------------------------------------------------------------------------

def compose_config(overrides: Sequence[str]) -> dict:
    """The config a run with these overrides would get (Hydra's compose API: ``method=``, ``+experiment=``)."""
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from adamerge.overrides import compose_overrides

    try:
        cfg = compose_overrides(overrides)
        cfg.output_dir = None  # Hydra's run directory does not exist here; the plan writes nothing
        return OmegaConf.to_container(cfg, resolve=True)
    except (HydraException, OmegaConfBaseException) as e:
        raise AdamergeError(f"plan: {str(e).splitlines()[0]}") from e


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m adamerge plan OVERRIDE...``: the table and the one-line summary; exit 0 whether or not it fits."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        print("usage: python -m adamerge plan [OVERRIDE ...] [plan.device_memory=80GB] [plan.host_memory=SIZE]\n"
              "Memory per device and on the host for the run these overrides describe, before anything is "
              "downloaded.")
        return 0
    from adamerge.validate import check_known_keys, check_numbers

    try:
        config = compose_config(argv)
        check_known_keys(config)
        check_numbers(config)
        print(make_plan(config).table())
    except AdamergeError as e:
        print(f"adamerge: error: {e}", file=sys.stderr)
        return 2
    return 0
