"""Command-line overrides, shared by the run (``__main__``), ``plan`` and ``inspect``: the mappings whose keys
are the user's own names, a twice-given expert, and composing the config outside ``hydra.main``."""

from __future__ import annotations

from collections.abc import Sequence

from omegaconf import DictConfig

# Mappings whose keys are the user's own names (tasks, globs): ``pool.experts.NAME=X`` may add a key.
OPEN_MAPPINGS = ("pool.experts.", "data.paths.", "eval.tests.", "objective.task_weights.", "granularity.chunks.",
                 "granularity.init.", "pool.zeroshot.classnames.", "pool.zeroshot.templates.", "search.dev.")


def is_open_mapping_override(arg: str) -> bool:
    """``pool.experts.NAME=X``, or a whole mapping as a dict literal: ``granularity.chunks={x*:4}``."""
    key, eq, value = arg.partition("=")
    return bool(eq) and (key.startswith(OPEN_MAPPINGS) or (f"{key}." in OPEN_MAPPINGS and value.startswith("{")))


def open_mapping_overrides(argv: list[str]) -> list[str]:
    """Turn ``pool.experts.NAME=X`` into Hydra's add-or-override ``++pool.experts.NAME=X``.

    Everywhere else Hydra's struct mode stays strict, so a misspelled key is still an error.
    """
    return [f"++{a}" if is_open_mapping_override(a) else a for a in argv]


def duplicate_experts(argv: list[str]) -> str | None:
    """Hydra keeps the last of ``pool.experts.a=X pool.experts.a=Y`` silently: an expert would be lost."""
    seen: dict[str, str] = {}
    for arg in argv:
        key, eq, value = arg.lstrip("+").partition("=")
        if not eq or not key.startswith("pool.experts."):
            continue
        if key in seen:
            return f"{key} is given twice ({seen[key]} and {value}); give each expert its own name"
        seen[key] = value
    return None


def compose_overrides(overrides: Sequence[str]) -> DictConfig:
    """The config a run with these overrides would get, through Hydra's compose API (``method=``,
    ``+experiment=``); Hydra's and OmegaConf's errors are the caller's to word."""
    from hydra import compose, initialize_config_module

    from adamerge.resolvers import register_resolvers

    register_resolvers()
    with initialize_config_module("adamerge.conf", version_base=None):
        return compose("config", overrides=open_mapping_overrides(list(overrides)))
