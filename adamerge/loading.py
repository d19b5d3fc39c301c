"""A run's inputs from its config: the pool, the base's tokenizer, the calibration and test rows, the task vectors.

The first step of ``run.run`` after the checks (``checks.py``); nothing here trains or writes. Components are
picked by name from registries and built with the config group's keys as keyword arguments, never through a
``_target_`` in user data.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from adamerge.data import load_task_examples
from adamerge.errors import AdamergeError
from adamerge.objectives.base import Objective
from adamerge.options import parse_dtype, parse_offload
from adamerge.pool import ExpertPool
from adamerge.taskvectors import TaskVectors, preprocess


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


def load_test_sets(cfg: Mapping, causal: bool) -> dict[str, Sequence[Mapping]]:
    """``eval.tests``: labeled rows per task (prompt + answer for generation, text + integer label for classifiers)."""
    field, label_field = cfg.get("field", "text"), cfg.get("label_field", "label")
    fields, integers = (["prompt", "answer"], []) if causal else ([field, label_field], [label_field])
    return {t: load_task_examples(p, fields, t, cfg.get("limit"), integer_fields=integers)
            for t, p in (cfg.get("tests") or {}).items()}


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
