"""Check a run's whole configuration before anything is loaded: keys, numbers, names and the output directory.

The README promises that bad input is refused before the work it would waste, with one line. Every
check here reads only the config and the file system (never a model), so a typo in a number or a
path costs milliseconds, not the minutes of loading a base and K experts. Data files, sources and
``resume=`` are checked where they are read (``data.py``, ``pool.py``, ``resume.py``), which
``checks.py`` calls in this order before it loads a model.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from functools import cache
from importlib import resources
from numbers import Integral, Real
from typing import Any

import yaml

from adamerge.errors import AdamergeError

# Sections whose keys are the user's own names, not options (any key is allowed inside them).
OPEN_SECTIONS = {"experts", "paths", "tests", "task_weights", "chunks", "zeroshot", "columns"}
# Config groups picked by ``name``: their components refuse unknown keyword arguments themselves.
NAMED_GROUPS = {"granularity", "objective", "optim", "logger", "trainer", "method", "compare", "hydra"}
# A task name becomes a path component (``output_dir/tasks/<task>/``): letters, digits and ``._-+@=,``.
SAFE_NAME = re.compile(r"[A-Za-z0-9_+@=,-][A-Za-z0-9._+@=,-]{0,99}")


@cache
def known_keys(group: str | None = None, *path: str) -> frozenset[str]:
    """Keys the packaged configs define at ``path`` inside ``config.yaml`` (``group=None``) or inside any file
    of a config group; the top level also knows the groups themselves."""
    conf = resources.files("adamerge.conf")
    files = [conf / "config.yaml"] if group is None else \
        [f for f in (conf / group).iterdir() if f.name.endswith(".yaml")]
    keys: set[str] = set()
    for f in files:
        node = yaml.safe_load(f.read_text()) or {}
        for part in path:
            node = node.get(part) or {}
        keys.update(k for k in node if k != "defaults")
    if group is None and not path:
        keys.update(p.name for p in conf.iterdir() if p.is_dir() and not p.name.startswith("_"))
    return frozenset(keys)


def check_known_keys(config: Mapping[str, Any]) -> None:
    """A misspelled key is an error that names it, in the Python API as on the command line (where
    Hydra's struct mode already refuses it): ``pool.preprocess.densty`` must not be ignored."""
    unknown_top = sorted(set(config) - known_keys() - NAMED_GROUPS)
    if unknown_top:
        raise AdamergeError(f"unknown config key {unknown_top[0]!r}; known: {', '.join(sorted(known_keys()))}")
    for section in ("pool", "data"):
        check_section(config.get(section) or {}, section, known_keys(section))
    preprocess = (config.get("pool") or {}).get("preprocess") or {}
    check_section(preprocess, "pool.preprocess", known_keys("pool", "preprocess"))
    for section in ("eval", "checkpoint", "output", "hub"):
        check_section(config.get(section) or {}, section, known_keys(None, section))


def check_section(values: Mapping[str, Any], where: str, allowed: frozenset[str]) -> None:
    if not isinstance(values, Mapping):
        raise AdamergeError(f"{where} must be a mapping of options, got {type(values).__name__}")
    unknown = sorted(k for k in values if k not in allowed and k not in OPEN_SECTIONS)
    if unknown:
        raise AdamergeError(f"unknown key {where}.{unknown[0]}; known: {', '.join(sorted(allowed))}")


def integer(value: Any, key: str, minimum: int | None, allow_none: bool = False) -> None:
    """``key`` must be an integer >= ``minimum`` (``None``: any integer; ``allow_none``: null means "no limit")."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, Integral) or (minimum is not None and value < minimum):
        what = {None: "an integer", 1: "a positive integer"}.get(minimum, f"an integer >= {minimum}")
        raise AdamergeError(f"{key}={value!r} must be {what}{' or null' if allow_none else ''}")


def positive_number(value: Any, key: str) -> None:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value <= 0:
        raise AdamergeError(f"{key}={value!r} must be a finite number > 0")


def check_init(init: Any) -> None:
    """``granularity.init``: ``uniform``, ``sens``, a finite number, or expert -> finite number (ranges are the
    granularity's to check, against its transform)."""
    values = init.values() if isinstance(init, Mapping) else [init]
    if init in ("uniform", "sens"):
        return
    for v in values:
        if isinstance(v, bool) or not isinstance(v, Real) or not math.isfinite(v):
            raise AdamergeError(f"granularity.init={v!r} must be a finite number, a mapping expert -> number, "
                                "uniform or sens")


def check_numbers(config: Mapping[str, Any]) -> None:
    """Types and ranges of the numbers a run reads, before anything is loaded."""
    data, trainer = config.get("data") or {}, config.get("trainer") or {}
    integer(config.get("seed", 0), "seed", None)
    integer(trainer.get("max_steps", 0), "trainer.max_steps", 0)
    integer(data.get("batch_size", 8), "data.batch_size", 1)
    integer(data.get("max_length", 512), "data.max_length", 1)
    integer(data.get("limit"), "data.limit", 1, allow_none=True)
    integer((config.get("eval") or {}).get("limit"), "eval.limit", 1, allow_none=True)
    integer((config.get("eval") or {}).get("batch_size", 64), "eval.batch_size", 1)
    integer((config.get("checkpoint") or {}).get("every_n_steps", 50), "checkpoint.every_n_steps", 1)
    if "lr" in (config.get("optim") or {}):
        positive_number(config["optim"]["lr"], "optim.lr")
    check_init((config.get("granularity") or {}).get("init", 0.3))


def check_task_names(names: Iterable[Any]) -> list[str]:
    """Expert (task) names become directory names and log keys: each must be a safe single path component."""
    checked = []
    for name in names:
        if not isinstance(name, str) or not SAFE_NAME.fullmatch(name):
            raise AdamergeError(
                f"expert name {name!r} cannot be used: names become directory names (output_dir/tasks/NAME), so "
                "use up to 100 letters, digits and ._-+@=, (not starting with '.')")
        checked.append(name)
    return checked
