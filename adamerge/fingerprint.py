"""Cheap fingerprints of a run's inputs, so that ``adamerge fold`` notices an expert that changed on disk.

A refold rebuilds the task vectors from the recorded sources; if one of them was replaced since the run,
the learned coefficients would be applied to other weights and give another model, silently. Each
file of a local model directory is recorded by size and SHA-256: of the whole file when it is small,
of its safetensors header (names, shapes, dtypes, offsets) and its first and last MiB otherwise.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

WHOLE_FILE_BYTES = 16 << 20  # files up to 16 MiB are hashed whole
SAMPLE_BYTES = 1 << 20


def file_digest(path: Path) -> str:
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= WHOLE_FILE_BYTES:
            digest.update(f.read())
            return digest.hexdigest()
        if path.suffix == ".safetensors":
            header_len = int.from_bytes(f.read(8), "little")
            digest.update(f.read(min(header_len, size - 8)))
        f.seek(0)
        digest.update(f.read(SAMPLE_BYTES))
        f.seek(size - SAMPLE_BYTES)
        digest.update(f.read(SAMPLE_BYTES))
    return digest.hexdigest()


def fingerprint(source: Any) -> dict[str, Any]:
    """``{file: "size:sha256"}`` of a local model or adapter directory; a hub id or in-memory model as such."""
    if not isinstance(source, (str, Path)):
        return {"in-memory": True}
    path = Path(source).expanduser()
    if not path.is_dir():
        return {"id": str(source)}
    return {f.name: f"{f.stat().st_size}:{file_digest(f)}" for f in sorted(path.iterdir())
            if f.is_file() and not f.name.startswith(".")}


def fingerprints(base: Any, experts: Mapping[str, Any]) -> dict[str, Any]:
    return {"base": fingerprint(base), "experts": {name: fingerprint(src) for name, src in experts.items()}}


def changed_inputs(recorded: Mapping[str, Any], base: Any, experts: Mapping[str, Any]) -> list[str]:
    """One phrase per input whose fingerprint differs from ``recorded`` (``fingerprints`` of the run)."""
    now = fingerprints(base, experts)
    roles = {"the base": (recorded.get("base"), now["base"])}
    roles.update({f"expert {name!r}": ((recorded.get("experts") or {}).get(name), now["experts"][name])
                  for name in experts})
    changes = []
    for role, (before, after) in roles.items():
        if before is None or before == after:
            continue
        files = sorted(f for f in set(before) | set(after) if before.get(f) != after.get(f))
        changes.append(f"{role} ({', '.join(files[:3])}{', ...' if len(files) > 3 else ''})")
    return changes
