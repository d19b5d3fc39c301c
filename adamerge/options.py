"""Config values read the same way by a run and by ``adamerge plan``: dtypes, ``pool.offload`` and components
built by name from a registry. Kept apart from ``run.py`` so that the plan, which must answer in seconds and
before anything is downloaded, does not import the trainer (Lightning alone takes seconds to import)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from adamerge.errors import AdamergeError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


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


def parse_offload(value: Any) -> bool:
    """``pool.offload``: null (task vectors on ``pool.device``) or ``cpu`` (host memory, streamed)."""
    if value in (None, False, "none"):
        return False
    if value != "cpu":
        raise AdamergeError(f"pool.offload={value!r}; choose from null, cpu")
    return True
