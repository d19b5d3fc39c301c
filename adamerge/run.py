"""One merge run from a resolved config: pool -> task vectors -> merged model -> trainer -> fold -> save.

``python -m adamerge`` (Hydra) and the Python API both end up in ``run``. Components are picked
by name from registries, never by a ``_target_`` in user data, and constructed with the config
group's keys as keyword arguments, so a misspelled key is an error that names it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import Logger
from pytorch_lightning.utilities import rank_zero_only

from adamerge.allocation import allocate_chunks, tensor_importance
from adamerge.checkpointing import AtomicCheckpointIO, checkpoint_callbacks
from adamerge.data import Collator, DataFree, TaskDataModule, load_task_examples, model_inputs
from adamerge.errors import AdamergeError
from adamerge.export import check_output_dir, copy_tokenizer, save_folded
from adamerge.granularity import GRANULARITIES, Layer, chunk_limit
from adamerge.loggers import build_logger, finish_logger
from adamerge.merged import MergedModel
from adamerge.objectives import OBJECTIVES, Objective
from adamerge.pool import ExpertPool
from adamerge.taskvectors import TaskVectors, preprocess
from adamerge.terminal import StepProgressBar
from adamerge.training import MergeModule

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def as_dict(cfg: Any) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg or {})


def parse_dtype(name: str | None, key: str) -> torch.dtype | None:
    if name is None:
        return None
    if name not in DTYPES:
        raise AdamergeError(f"{key}={name!r}; choose from {sorted(DTYPES)}")
    return DTYPES[name]


def construct(registry: Mapping[str, type], group: str, cfg: Mapping) -> Any:
    """Build ``registry[cfg.name](**rest)``; unknown names and keys become one clear error."""
    options = dict(cfg)
    name = options.pop("name", None)
    if name not in registry:
        raise AdamergeError(f"{group}={name!r} is unknown; choose from {sorted(registry)}")
    try:
        return registry[name](**options)
    except TypeError as e:
        raise AdamergeError(f"{group} {name!r}: {e}") from e


def build_pool(cfg: Mapping) -> ExpertPool:
    if not cfg.get("base"):
        raise AdamergeError("pool.base is not set: pool.base=DIR_OR_HUB_ID")
    names = list(cfg.get("experts") or {})
    if len(set(names)) != len(names):
        raise AdamergeError(f"duplicate expert names in pool.experts: {names}")
    return ExpertPool(
        cfg["base"], dict(cfg.get("experts") or {}), auto_class=cfg.get("auto_class", "AutoModelForCausalLM"),
        include=cfg.get("include") or (), exclude=cfg.get("exclude") or (),
        trust_remote_code=bool(cfg.get("trust_remote_code")), allow_pickle=bool(cfg.get("allow_pickle")),
        dtype=parse_dtype(cfg.get("dtype"), "pool.dtype"), heads=cfg.get("heads"), task_model=build_task_model(cfg),
    )


def build_task_model(cfg: Mapping):
    """``pool.zeroshot`` (class names and prompt templates per task): CLIP zero-shot heads; else none."""
    if not cfg.get("zeroshot"):
        return None
    from adamerge.zeroshot import ZeroShotTasks

    try:
        return ZeroShotTasks(str(cfg["base"]), list(cfg.get("experts") or {}), **cfg["zeroshot"],
                             trust_remote_code=bool(cfg.get("trust_remote_code")))
    except TypeError as e:
        raise AdamergeError(f"pool.zeroshot: {e}") from e


def parse_offload(value: Any) -> bool:
    """``pool.offload``: null (task vectors on ``pool.device``) or ``cpu`` (host memory, streamed)."""
    if value in (None, False, "none"):
        return False
    if value != "cpu":
        raise AdamergeError(f"pool.offload={value!r}; choose from null, cpu")
    return True


def build_task_vectors(pool: ExpertPool, cfg: Mapping, seed: int = 0) -> TaskVectors:
    return prepare_task_vectors(raw_task_vectors(pool, cfg), cfg, seed)


def raw_task_vectors(pool: ExpertPool, cfg: Mapping) -> TaskVectors:
    """The pool's task vectors in ``pool.tv_dtype`` on ``pool.device`` (pinned host memory under offload)."""
    offload = parse_offload(cfg.get("offload"))
    if offload and cfg.get("device") not in (None, "cpu"):
        raise AdamergeError(f"pool.offload=cpu keeps task vectors in host memory; unset pool.device={cfg['device']!r}")
    return pool.task_vectors(dtype=parse_dtype(cfg.get("tv_dtype"), "pool.tv_dtype"), device=cfg.get("device"),
                             pin_memory=offload and torch.cuda.is_available())


def prepare_task_vectors(tv: TaskVectors, cfg: Mapping, seed: int = 0) -> TaskVectors:
    """``pool.preprocess`` (TIES, DARE, ...) and then ``pool.offload``; ``tv`` itself is left untouched."""
    tv = apply_preprocess(tv, cfg.get("preprocess") or {}, seed)
    return tv.offload() if parse_offload(cfg.get("offload")) else tv


def apply_preprocess(tv: TaskVectors, cfg: Mapping, seed: int = 0) -> TaskVectors:
    """``pool.preprocess`` (``taskvectors.Preprocess``; a misspelled key is an error that names it)."""
    return preprocess(tv, seed=seed, **cfg)


def build_tokenizer(pool: ExpertPool, trust_remote_code: bool = False):
    """The base's tokenizer, or its image processor for a vision model (``main_input_name`` = pixel_values)."""
    if pool.base_source is None:
        return None
    from transformers import AutoImageProcessor, AutoTokenizer

    if is_vision(pool):
        try:
            return AutoImageProcessor.from_pretrained(str(pool.base_source), trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as e:
            raise AdamergeError(f"no image processor for the base {str(pool.base_source)!r}: "
                                f"{str(e).splitlines()[0]}") from e

    try:
        tok = AutoTokenizer.from_pretrained(str(pool.base_source), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise AdamergeError(f"no tokenizer for the base {str(pool.base_source)!r}: {str(e).splitlines()[0]}") from e
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    pool.check_tokenizers(tok)
    return tok


def is_causal(pool: ExpertPool) -> bool:
    return "CausalLM" in pool.auto_class.__name__


def is_vision(pool: ExpertPool) -> bool:
    """Models that read images (``main_input_name`` is ``pixel_values``): their data goes through an image processor."""
    return getattr(pool.base, "main_input_name", None) == "pixel_values"


def build_datamodule(cfg: Mapping, experts: list[str], tokenizer, objective: Objective, causal: bool,
                     seed: int) -> TaskDataModule | None:
    if not objective.needs_data:
        return None
    labeled = objective.needs_labels
    paths = cfg.get("paths") or {}
    missing = [e for e in experts if e not in paths]
    if missing:
        raise AdamergeError(f"no calibration data for task(s) {missing}: set data.paths.TASK=FILE")
    field_names = [cfg.get("field", "prompt")]
    if labeled:
        field_names.append(cfg.get("answer_field", "answer") if causal else cfg.get("label_field", "label"))
    tasks = {e: load_task_examples(paths[e], field_names, e, cfg.get("limit")) for e in experts}
    collator = Collator(tokenizer, field=cfg.get("field", "prompt"), causal=causal,
                        max_length=cfg.get("max_length", 512),
                        answer_field=cfg.get("answer_field", "answer") if labeled and causal else None,
                        label_field=cfg.get("label_field", "label") if labeled and not causal else None,
                        add_bos=cfg.get("add_bos", "auto"), chat_template=bool(cfg.get("chat_template")))
    return TaskDataModule(tasks, collator, batch_size=cfg.get("batch_size", 8), shuffle=cfg.get("shuffle", True),
                          seed=seed)


@dataclass
class RunResult:
    output_dir: Path | None
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    coefficients: dict[str, torch.Tensor] = field(default_factory=dict)
    fold_max_diff: float | None = None
    seconds: float = 0.0


def evaluate_model(model_for: Callable[[str], torch.nn.Module], tokenizer, cfg: Mapping, causal: bool
                   ) -> dict[str, float]:
    """Score ``model_for(task)`` on each task of ``eval.tests`` (JSONL or ``{dataset, split}``): exact match
    (generative) or accuracy (classifiers, ``eval.field`` holding text or images, ``eval.label_field``)."""
    from adamerge.evaluate import accuracy, exact_match

    field, label_field = cfg.get("field", "text"), cfg.get("label_field", "label")
    fields = ["prompt", "answer"] if causal else [field, label_field]
    tests = {t: load_task_examples(p, fields, t, cfg.get("limit")) for t, p in (cfg.get("tests") or {}).items()}
    if not tests:
        return {}
    batch_size = cfg.get("batch_size", 64)
    scores = {
        t: exact_match(model_for(t), tokenizer, rows, cfg.get("max_new_tokens", 16), batch_size) if causal
        else accuracy(model_for(t), tokenizer, rows, batch_size, field, label_field)
        for t, rows in tests.items()
    }
    return {**scores, "avg": sum(scores.values()) / len(scores)}


def evaluate_merged(merged: MergedModel, tokenizer, cfg: Mapping, causal: bool) -> dict[str, float]:
    """Evaluate the folded merge: one model for all tasks, or backbone + head k per task."""
    if not cfg.get("tests"):
        return {}
    shared = None if len(merged.heads) else merged.fold()
    return evaluate_model(lambda task: shared if shared is not None else merged.fold(task), tokenizer, cfg, causal)


@torch.no_grad()
def fold_difference(merged: MergedModel, folded, batch: Mapping[str, torch.Tensor]) -> float:
    """Max |logits(folded) - logits(merged)| on one batch: the fold's self-check."""

    inputs = {k: v.to(merged.base.device) for k, v in model_inputs(batch).items()}
    return (folded(**inputs).logits.float() - merged(**inputs).logits.float()).abs().max().item()


def fit(merged: MergedModel, objective: Objective, data, tokenizer, config: Mapping, run_dir: Path, max_steps: int,
        logger: Logger | None = None, resume: str | None = None) -> None:
    """One ``Trainer.fit`` of the coefficients (and the objective's extra tensors)."""
    objective.setup(merged, data, tokenizer)
    module = MergeModule(merged, objective, config.get("optim"))
    trainer_cfg = {**(config.get("trainer") or {}), "max_steps": max_steps}
    callbacks, plugins = [], []
    if trainer_cfg.get("enable_checkpointing", True):
        every = int((config.get("checkpoint") or {}).get("every_n_steps", 50))
        callbacks, plugins = checkpoint_callbacks(run_dir, every), [AtomicCheckpointIO()]
    if trainer_cfg.get("enable_progress_bar", True):
        callbacks.append(StepProgressBar())
    trainer = pl.Trainer(default_root_dir=str(run_dir), logger=logger or False, callbacks=callbacks, plugins=plugins,
                         **trainer_cfg)
    trainer.fit(module, datamodule=data or DataFree(max_steps), ckpt_path=resume)
    objective.finish(merged)


def chunk_allocation_stage(pool: ExpertPool, task_vectors: TaskVectors, gran_cfg: dict, objective: Objective, data,
                           tokenizer, config: Mapping, run_dir: Path, steps: int, logger: Logger | None = None):
    """Expert Merging++ stage 1: train layer-wise, then allocate the chunk budget by importance."""
    common = {k: gran_cfg[k] for k in ("init", "transform", "space") if k in gran_cfg}
    stage1 = MergedModel(pool.base, task_vectors, Layer(**common), bool(config.get("recompute")))
    fit(stage1, objective, data, tokenizer, config, run_dir / "stage1", steps, logger)
    table = stage1.granularity.table()
    importance = tensor_importance(table, task_vectors.sq_norms(), task_vectors.infos)
    limits = {n: chunk_limit(i, gran_cfg.get("chunking", "flat")) for n, i in task_vectors.infos.items()}
    counts = allocate_chunks(importance, int(gran_cfg["budget"]), limits)
    log.info("Expert Merging++ chunk allocation (budget %s): %s", gran_cfg["budget"], counts)
    (run_dir / "chunk_allocation.json").write_text(json.dumps({"importance": importance, "counts": counts}, indent=2))
    return counts, table


def build_merged(pool: ExpertPool, task_vectors: TaskVectors, config: Mapping, objective: Objective, data, tokenizer,
                 run_dir: Path, max_steps: int, logger: Logger | None = None) -> tuple[MergedModel, int]:
    """The MergedModel to train; with ``granularity.budget`` (chunk), after Expert Merging++'s stage 1.

    Returns the model and the number of steps left for the main fit.
    """
    gran_cfg = dict(config["granularity"])
    budget, stage1_steps = gran_cfg.pop("budget", None), gran_cfg.pop("stage1_steps", None)
    per_tensor = gran_cfg.pop("budget_per_tensor", None)
    if per_tensor and not budget:  # a budget that needs no knowledge of the model: a multiple of its tensor count
        budget = round(float(per_tensor) * len(task_vectors.infos))
    if not budget:
        granularity = construct(GRANULARITIES, "granularity", gran_cfg)
        return MergedModel(pool.base, task_vectors, granularity, bool(config.get("recompute"))), max_steps
    if gran_cfg.get("name") != "chunk":
        raise AdamergeError("granularity.budget (Expert Merging++ allocation) needs granularity=chunk")
    steps1 = int(stage1_steps or max_steps // 2)
    counts, table = chunk_allocation_stage(pool, task_vectors, {**gran_cfg, "budget": budget}, objective, data,
                                           tokenizer, config, run_dir, steps1, logger)
    chunk = construct(GRANULARITIES, "granularity", {**gran_cfg, "counts": counts})
    merged = MergedModel(pool.base, task_vectors, chunk, bool(config.get("recompute")))
    chunk.load_table(table)
    return merged, max_steps - steps1


def run(cfg: DictConfig | Mapping, run_dir: str | Path = ".", pool: ExpertPool | None = None,
        task_vectors: TaskVectors | None = None) -> RunResult:
    """Train (unless ``trainer.max_steps=0``), fold and write ``output_dir``; returns the metrics.

    ``pool`` / ``task_vectors`` may be passed in to share them between runs (method comparisons).
    """
    start = time.perf_counter()
    config = as_dict(cfg)
    run_dir = Path(run_dir)
    seed = int(config.get("seed", 0))
    output_dir = config.get("output_dir")
    if output_dir:
        check_output_dir(output_dir, bool(config.get("overwrite")))
    objective: Objective = construct(OBJECTIVES, "objective", config["objective"])
    if not objective.supports_offload and parse_offload(config["pool"].get("offload")):
        raise AdamergeError(f"objective={config['objective']['name']} rewrites the task vectors themselves, next to "
                            "the coefficients; it does not take pool.offload=cpu")
    pl.seed_everything(seed, workers=True, verbose=False)
    pool = pool or build_pool(config["pool"])
    task_vectors = task_vectors or build_task_vectors(pool, config["pool"], seed)
    tokenizer = build_tokenizer(pool, bool(config["pool"].get("trust_remote_code")))
    causal = is_causal(pool)
    data = build_datamodule(config.get("data") or {}, list(task_vectors.experts), tokenizer, objective, causal, seed)
    max_steps = int((config.get("trainer") or {}).get("max_steps", 0))
    logger = build_logger(config.get("logger"), run_dir, config)
    merged, steps_left = build_merged(pool, task_vectors, config, objective, data, tokenizer, run_dir, max_steps,
                                      logger)
    eval_cfg = config.get("eval") or {}
    metrics = {"before": evaluate_merged(merged, tokenizer, eval_cfg, causal)}
    if steps_left != 0:
        fit(merged, objective, data, tokenizer, config, run_dir, steps_left, logger, config.get("resume"))

    metrics["after"] = evaluate_merged(merged, tokenizer, eval_cfg, causal)
    finish_logger(logger, metrics, merged, max_steps)
    diff = None
    if data is not None:
        first = merged.experts[0]
        with merged.task(first):
            diff = fold_difference(merged, merged.fold(first), next(iter(data.loader(first, shuffle=False))))
    result = RunResult(Path(output_dir) if output_dir else None, metrics, merged.granularity.table(), diff)
    result.seconds = time.perf_counter() - start
    if diff is not None:
        log.info("fold check: max |folded - merged| logits = %.3g", diff)
    if output_dir and rank_zero_only.rank == 0:  # under DDP every rank gets here; one writes
        write_output(merged, pool, objective, config, result)
    return result


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
            copy_tokenizer(pool.base_source, into / "tasks" / task, pool.trust_remote_code)


def write_output(merged: MergedModel, pool: ExpertPool, objective: Objective, config: Mapping,
                 result: RunResult) -> None:
    """The folded checkpoint with its coefficients, config, card and metrics.json (atomic).

    With per-task heads, ``output_dir`` holds the merged backbone as a plain ``AutoModel``
    checkpoint and ``tasks/<task>/`` one classifier per task.
    """
    heads = len(merged.heads) > 0
    folded = merged.fold().base_model if heads else merged.fold()

    def extra_files(tmp: Path) -> None:
        (tmp / "metrics.json").write_text(json.dumps(result.metrics, indent=2))
        if heads:
            write_task_heads(merged, pool, tmp)
        if is_vision(pool) and pool.base_source is not None:  # the base's image processor (text: its tokenizer)
            build_tokenizer(pool, pool.trust_remote_code).save_pretrained(tmp)

    granularity = merged.granularity
    details = {"granularity": config["granularity"].get("name"), "space": granularity.space,
               "transform": granularity.transform, "objective": config["objective"].get("name"),
               "steps": (config.get("trainer") or {}).get("max_steps", 0),
               "fold max |diff| (logits)": result.fold_max_diff}
    if heads:
        details["tasks"] = getattr(merged.base, "heads_file", None) or ", ".join(f"tasks/{t}" for t in merged.experts)
    coefficients = {**result.coefficients, **granularity.state_tensors(), **objective.state_tensors()}
    save_folded(
        folded, result.output_dir, base_source=pool.base_source,
        experts={k: "in-memory" if isinstance(v, torch.nn.Module) or callable(v) else str(v)
                 for k, v in pool.expert_sources.items()},
        coefficients=coefficients,
        coefficient_metadata={"experts": merged.experts, "granularity": config["granularity"],
                              "transform": granularity.transform, "space": granularity.space},
        config=config, details=details, metrics={k: v for k, v in result.metrics.items() if v},
        overwrite=bool(config.get("overwrite")), trust_remote_code=bool(config["pool"].get("trust_remote_code")),
        extra_files=extra_files,
    )
