"""One merge run from a resolved config: pool -> task vectors -> merged model -> trainer -> fold -> save.

``python -m adamerge`` (Hydra) and the Python API both end up in ``run``. Components are picked
by name from registries, never by a ``_target_`` in user data, and constructed with the config
group's keys as keyword arguments, so a misspelled key is an error that names it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import Logger
from pytorch_lightning.utilities import rank_zero_only

from adamerge.allocation import allocate_chunks, tensor_importance
from adamerge.checkpointing import (
    AtomicCheckpointIO,
    check_resume_fits,
    checkpoint_callbacks,
    lightning_handles_sigterm,
    read_resume,
)
from adamerge.data import Collator, DataFree, TaskDataModule, load_task_examples, model_inputs
from adamerge.errors import AdamergeError
from adamerge.export import check_output_dir, copy_tokenizer, save_folded
from adamerge.fingerprint import fingerprints
from adamerge.granularity import GRANULARITIES, Layer, Task, chunk_limit
from adamerge.harness import HarnessOptions, harness_options, harness_section, model_index, reference_scores
from adamerge.kinship import merged_kinship
from adamerge.loggers import build_logger, finish_logger
from adamerge.lora_output import (
    ADAPTER_DIR,
    build_adapter,
    card_section,
    check_adapter_fits,
    output_options,
    write_adapter,
)
from adamerge.merged import MergedModel
from adamerge.objectives import OBJECTIVES, Objective
from adamerge.options import construct, parse_dtype, parse_offload
from adamerge.plan import plan_line
from adamerge.pool import ExpertPool, is_local
from adamerge.publish import hub_options, publish
from adamerge.taskvectors import TaskVectors, preprocess
from adamerge.terminal import StepProgressBar
from adamerge.training import MergeModule
from adamerge.validate import check_known_keys, check_numbers, check_task_names

log = logging.getLogger(__name__)


def as_dict(cfg: Any) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg or {})


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
        tokenizer=str(cfg.get("tokenizer") or "union"),
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
    """The base's tokenizer, or its image processor for a vision model (``main_input_name`` = pixel_values).

    Data is tokenized with the base's tokenizer even where experts added tokens (``adamerge/vocab.py`` says
    why); the merged one is what ``write_output`` saves."""
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
    return tok


def is_causal(pool: ExpertPool) -> bool:
    return "CausalLM" in pool.auto_class.__name__


def is_vision(pool: ExpertPool) -> bool:
    """Models that read images (``main_input_name`` is ``pixel_values``): their data goes through an image processor."""
    return getattr(pool.base, "main_input_name", None) == "pixel_values"


def load_calibration(cfg: Mapping, experts: list[str], objective: Objective, causal: bool
                     ) -> dict[str, Sequence[Mapping]]:
    """Each task's calibration rows, read and checked before any model is loaded."""
    paths = cfg.get("paths") or {}
    missing = [e for e in experts if e not in paths]
    if missing:
        raise AdamergeError(f"no calibration data for task(s) {missing}: set data.paths.TASK=FILE")
    text_field, label_field = cfg.get("field", "prompt"), cfg.get("label_field", "label")
    fields, integers = [text_field], []
    if objective.needs_labels:
        fields.append(cfg.get("answer_field", "answer") if causal else label_field)
        integers = [] if causal else [label_field]
    return {e: load_task_examples(paths[e], fields, e, cfg.get("limit"), integer_fields=integers) for e in experts}


def needs_calibration(config: Mapping, objective: Objective) -> bool:
    """Training needs the objective's data; a static merge (``max_steps=0``) uses data only if given
    (then for the fold check), so task arithmetic, TIES, ... run data-free."""
    steps = int((config.get("trainer") or {}).get("max_steps", 0))
    return objective.needs_data and (steps > 0 or bool((config.get("data") or {}).get("paths")))


def max_positions(model: torch.nn.Module) -> int | None:
    """The longest input the model's position embeddings allow (None: no such limit, e.g. rotary)."""
    config = getattr(model, "config", None)
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def warn_long_rows(rows: Mapping[str, Sequence[Mapping]], tokenizer, field: str, max_length: int) -> None:
    """Say how many rows are longer than ``max_length`` tokens: they are cut from the left (the end, which
    the scored positions read, is kept)."""
    for task, task_rows in rows.items():
        if not isinstance(task_rows, list) or not callable(tokenizer):
            continue  # a lazy dataset (images, hub splits): not tokenized up front
        long = sum(len(tokenizer(r[field])["input_ids"]) > max_length for r in task_rows)
        if long:
            log.warning("task %r: %d of %d calibration rows are longer than %d tokens; their start is cut "
                        "(left truncation)", task, long, len(task_rows), max_length)


def build_datamodule(cfg: Mapping, rows: Mapping[str, Sequence[Mapping]] | None, tokenizer, objective: Objective,
                     causal: bool, seed: int, positions: int | None = None,
                     model_bos_id: int | None = None) -> TaskDataModule | None:
    if rows is None:
        return None
    labeled = objective.needs_labels
    max_length = min(cfg.get("max_length", 512), positions or cfg.get("max_length", 512))
    warn_long_rows(rows, tokenizer, cfg.get("field", "prompt"), max_length)
    collator = Collator(tokenizer, field=cfg.get("field", "prompt"), causal=causal, max_length=max_length,
                        answer_field=cfg.get("answer_field", "answer") if labeled and causal else None,
                        label_field=cfg.get("label_field", "label") if labeled and not causal else None,
                        add_bos=cfg.get("add_bos", "auto"), chat_template=bool(cfg.get("chat_template")),
                        model_bos_id=model_bos_id)
    return TaskDataModule(rows, collator, batch_size=cfg.get("batch_size", 8), shuffle=cfg.get("shuffle", True),
                          seed=seed)


@dataclass
class RunResult:
    output_dir: Path | None
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    coefficients: dict[str, torch.Tensor] = field(default_factory=dict)
    fold_max_diff: float | None = None
    seconds: float = 0.0


def load_test_sets(cfg: Mapping, causal: bool) -> dict[str, Sequence[Mapping]]:
    """``eval.tests``: labeled rows per task (prompt + answer for generation, text + integer label for classifiers)."""
    field, label_field = cfg.get("field", "text"), cfg.get("label_field", "label")
    fields, integers = (["prompt", "answer"], []) if causal else ([field, label_field], [label_field])
    return {t: load_task_examples(p, fields, t, cfg.get("limit"), integer_fields=integers)
            for t, p in (cfg.get("tests") or {}).items()}


def evaluate_model(model_for: Callable[[str], torch.nn.Module], tokenizer, cfg: Mapping, causal: bool
                   ) -> dict[str, float]:
    """Score ``model_for(task)`` on each task of ``eval.tests`` (JSONL or ``{dataset, split}``): exact match
    (generative) or accuracy (classifiers, ``eval.field`` holding text or images, ``eval.label_field``)."""
    from adamerge.evaluate import accuracy, exact_match

    field, label_field = cfg.get("field", "text"), cfg.get("label_field", "label")
    tests = load_test_sets(cfg, causal)
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


def task_vectors_and_references(pool: ExpertPool, cfg: Mapping, seed: int, harness: HarnessOptions | None,
                                tokenizer) -> tuple[TaskVectors, dict]:
    """``build_task_vectors``, with the harness scores of the base and (``eval.harness.experts``) each expert taken
    in between: on the raw task vectors, so an expert is the one the pool gave, not its ``pool.preprocess``ed self."""
    raw = raw_task_vectors(pool, cfg)
    if harness is None:
        return prepare_task_vectors(raw, cfg, seed), {}
    teacher = MergedModel(pool.base, raw, Task(init=0.0))

    def expert(name: str) -> torch.nn.Module:
        with teacher.as_expert(name):
            return teacher.fold()

    scores = reference_scores(harness, pool.base, {n: lambda n=n: expert(n) for n in teacher.experts}, tokenizer)
    return prepare_task_vectors(raw, cfg, seed), scores


@torch.no_grad()
def fold_difference(merged: MergedModel, folded, batch: Mapping[str, torch.Tensor]) -> float:
    """Max |logits(folded) - logits(merged)| on one batch: the fold's self-check."""

    inputs = {k: v.to(merged.base.device) for k, v in model_inputs(batch).items()}
    logits = merged(**inputs).logits.float()  # the folded model may have more: the rows of experts' added tokens
    return (folded(**inputs).logits[..., : logits.shape[-1]].float() - logits).abs().max().item()


def fit(merged: MergedModel, objective: Objective, data, tokenizer, config: Mapping, run_dir: Path, max_steps: int,
        logger: Logger | None = None, resume: str | None = None) -> None:
    """One ``Trainer.fit`` of the coefficients (and the objective's extra tensors). ``resume``: a checkpoint whose
    tensors must be exactly this run's trainable ones (checked before Lightning starts, so nothing is written)."""
    objective.setup(merged, data, tokenizer)
    module = MergeModule(merged, objective, config.get("optim"))
    if resume:
        check_resume_fits(read_resume(resume, merged.experts), module.trainable())
    trainer_cfg = {**(config.get("trainer") or {}), "max_steps": max_steps}
    callbacks, plugins = [], []
    if trainer_cfg.get("enable_checkpointing", True):
        every = int((config.get("checkpoint") or {}).get("every_n_steps", 50))
        callbacks, plugins = checkpoint_callbacks(run_dir, every), [AtomicCheckpointIO()]
    if trainer_cfg.get("enable_progress_bar", True):
        callbacks.append(StepProgressBar())
    trainer = pl.Trainer(default_root_dir=str(run_dir), logger=logger or False, callbacks=callbacks, plugins=plugins,
                         **trainer_cfg)
    with lightning_handles_sigterm():
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


def protected_inputs(config: Mapping, others: Mapping[str, Path]) -> dict[str, Path]:
    """What ``output_dir`` must never be or contain (role -> path): local models, data files' directories,
    the resume checkpoint's directory, and ``others`` (the run directory)."""
    pool_cfg, data_cfg, eval_cfg = (config.get(k) or {} for k in ("pool", "data", "eval"))
    protected = dict(others)
    sources = {"the base": pool_cfg.get("base"),
               **{f"expert {n!r}": s for n, s in (pool_cfg.get("experts") or {}).items()}}
    protected.update({role: Path(s) for role, s in sources.items() if isinstance(s, (str, Path)) and is_local(s)})
    for kind, paths in (("calibration", data_cfg.get("paths")), ("test", eval_cfg.get("tests"))):
        for task, source in (paths or {}).items():
            path = source.get("dataset") if isinstance(source, Mapping) else source
            if isinstance(path, (str, Path)) and Path(path).expanduser().exists():
                path = Path(path).expanduser()
                protected[f"the directory of task {task!r}'s {kind} data"] = path if path.is_dir() else path.parent
    if config.get("resume"):
        protected["the resume checkpoint's directory"] = Path(config["resume"]).expanduser().parent
    return protected


@dataclass
class Checked:
    """What the checks before loading produced: the objective, the calibration rows and the harness tasks."""

    objective: Objective
    rows: dict[str, Sequence[Mapping]] | None
    harness: HarnessOptions | None = None


def check_before_loading(config: Mapping, run_dir: Path, pool: ExpertPool | None = None) -> Checked:
    """Every check that needs no model, so that bad input costs milliseconds and writes nothing: config
    keys and numbers, expert names, the objective, ``output_dir``, the calibration data and ``resume=``.
    The sources' files are checked next, by ``ExpertPool``, before the base is loaded."""
    check_known_keys(config)
    check_numbers(config)
    output_options(config)
    hub_options(config)
    pool_cfg = config.get("pool") or {}
    experts = pool.expert_names if pool is not None else check_task_names(list(pool_cfg.get("experts") or {}))
    objective: Objective = construct(OBJECTIVES, "objective", config.get("objective") or {"name": "entropy"})
    if not objective.supports_offload and parse_offload(pool_cfg.get("offload")):
        raise AdamergeError(f"objective={config['objective']['name']} rewrites the task vectors themselves, next to "
                            "the coefficients; it does not take pool.offload=cpu")
    if config.get("output_dir") is not None:
        protected = protected_inputs(config, {"the run directory": run_dir})
        check_output_dir(config["output_dir"], bool(config.get("overwrite")), protected)
    causal = is_causal(pool) if pool is not None else "CausalLM" in str(pool_cfg.get("auto_class", "CausalLM"))
    rows = load_calibration(config.get("data") or {}, experts, objective, causal) \
        if needs_calibration(config, objective) else None
    load_test_sets(config.get("eval") or {}, causal)  # read again for the evaluation: small, and checked now
    if config.get("resume"):
        granularity = GRANULARITIES.get((config.get("granularity") or {}).get("name"))
        read_resume(config["resume"], experts, granularity.__name__ if granularity else None)
    return Checked(objective, rows, harness_options(config, causal))


def run(cfg: DictConfig | Mapping, run_dir: str | Path = ".", pool: ExpertPool | None = None,
        task_vectors: TaskVectors | None = None) -> RunResult:
    """Train (unless ``trainer.max_steps=0``), fold and write ``output_dir`` (``None``: nothing is written);
    returns the metrics. Everything that can be checked without a model is checked first.

    ``pool`` / ``task_vectors`` may be passed in to share them between runs (method comparisons).
    """
    start = time.perf_counter()
    config = as_dict(cfg)
    run_dir = Path(run_dir)
    checked = check_before_loading(config, run_dir, pool)
    log.info("%s", plan_line(config, checked.rows, pool.base if pool is not None else None))
    objective, seed, output_dir = checked.objective, int(config.get("seed", 0)), config.get("output_dir")
    pl.seed_everything(seed, workers=True, verbose=False)
    pool = pool or build_pool(config["pool"])
    tokenizer = build_tokenizer(pool, bool(config["pool"].get("trust_remote_code")))
    harness = checked.harness
    scores = {}  # lm-eval harness: model -> task -> metric -> value
    if task_vectors is None:  # built here: the base and the experts are scored here, once
        task_vectors, scores = task_vectors_and_references(pool, config["pool"], seed, harness, tokenizer)
    causal = is_causal(pool)
    data = build_datamodule(config.get("data") or {}, checked.rows, tokenizer, objective, causal, seed,
                            max_positions(pool.base), getattr(getattr(pool.base, "config", None), "bos_token_id", None))
    max_steps = int((config.get("trainer") or {}).get("max_steps", 0))
    logger = build_logger(config.get("logger"), run_dir, config)
    merged, steps_left = build_merged(pool, task_vectors, config, objective, data, tokenizer, run_dir, max_steps,
                                      logger)
    fmt, rank = output_options(config)
    if output_dir and fmt != "full":  # an adapter that cannot be written is refused before training
        check_adapter_fits(merged, pool, rank)
    eval_cfg = config.get("eval") or {}
    metrics = {"before": evaluate_merged(merged, tokenizer, eval_cfg, causal)}
    if harness:  # the merge is scored with the tokenizer output_dir gets (experts' added tokens included)
        merged_tokenizer = pool.vocabulary.merged_tokenizer() or tokenizer
        scores["before"] = harness.evaluate(merged.fold(), merged_tokenizer)
    if steps_left != 0:
        fit(merged, objective, data, tokenizer, config, run_dir, steps_left, logger, config.get("resume"))

    metrics["after"] = evaluate_merged(merged, tokenizer, eval_cfg, causal)
    if harness:  # without training the merge is the one scored before
        scores["after"] = harness.evaluate(merged.fold(), merged_tokenizer) if steps_left else scores["before"]
        metrics["harness"] = scores
    finish_logger(logger, metrics, merged, max_steps)
    diff = None
    if data is not None:
        first = merged.experts[0]
        with merged.task(first):
            diff = fold_difference(merged, merged.fold(first), next(iter(data.loader(first, shuffle=False))))
        log.info("fold check: max |folded - merged| logits = %.3g", diff)
    else:
        log.info("fold check skipped: no calibration data (data.paths) to run it on")
    result = RunResult(Path(output_dir) if output_dir else None, metrics, merged.granularity.table(), diff)
    result.seconds = time.perf_counter() - start
    if output_dir and rank_zero_only.rank == 0:  # under DDP every rank gets here; one writes
        write_output(merged, pool, objective, config, result, protected_inputs(config, {"the run directory": run_dir}))
        hub = hub_options(config)
        if hub is not None:  # after the atomic write: a failed upload leaves the local output complete
            publish(result.output_dir, **hub)
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
            copy_tokenizer(pool.base_source, into / "tasks" / task, pool.trust_remote_code,
                           pool.vocabulary.merged_tokenizer())


def write_output(merged: MergedModel, pool: ExpertPool, objective: Objective, config: Mapping,
                 result: RunResult, protected: Mapping[str, Path] | None = None,
                 details: Mapping[str, Any] | None = None) -> None:
    """The folded checkpoint with its coefficients, config, card and metrics.json (atomic).

    With per-task heads, ``output_dir`` holds the merged backbone as a plain ``AutoModel``
    checkpoint and ``tasks/<task>/`` one classifier per task. ``output.format=lora`` writes a PEFT adapter
    of the merge instead of the weights, ``both`` the full checkpoint and the adapter in ``adapter/``.
    """
    heads = len(merged.heads) > 0
    folded = merged.fold().base_model if heads else merged.fold()
    fmt, rank = output_options(config)
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
    coefficients = {**result.coefficients, **granularity.state_tensors(), **objective.state_tensors()}
    save_folded(
        folded, result.output_dir, base_source=pool.base_source,
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
        tokenizer=pool.vocabulary.merged_tokenizer(),
    )


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
