"""Write the folded checkpoint: a directory that loads with plain ``transformers``, written atomically.

Layout (DESIGN.md): ``config.json``, ``model.safetensors`` (or shards + index), the base's tokenizer
files, ``README.md`` (model card), ``adamerge_coefficients.safetensors`` and ``adamerge_config.yaml``.
Everything is built in a temporary directory beside the target and renamed into place, so a crash
or a full disk leaves either the previous directory or the complete new one.
"""

from __future__ import annotations

import ctypes
import glob
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file
from torch import nn

from adamerge.card import model_card
from adamerge.errors import AdamergeError

log = logging.getLogger(__name__)

COEFFICIENTS_FILE = "adamerge_coefficients.safetensors"
CONFIG_FILE = "adamerge_config.yaml"


def check_output_dir(output_dir: str | Path, overwrite: bool) -> Path:
    """Refuse a non-empty ``output_dir`` up front (before any work) unless ``overwrite`` is set."""
    path = Path(output_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise AdamergeError(f"output_dir={str(path)!r} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise AdamergeError(f"output_dir={str(path)!r} exists and is not empty; set overwrite=true to replace it")
    return path


def save_coefficients(path: Path, table: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]) -> None:
    """Coefficients per group as ``(K, n)`` fp32 tensors; experts and settings in the metadata."""
    tensors = {name: t.detach().float().cpu().contiguous() for name, t in table.items()}
    save_file(tensors, str(path), metadata={k: json.dumps(v) for k, v in metadata.items()})


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE) where the OS offers it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def replace_dir(tmp: Path, target: Path) -> None:
    """Move a finished ``tmp`` onto ``target``: atomic swap if possible, else two renames."""
    if not target.exists():
        os.rename(tmp, target)
        return
    if _exchange(tmp, target):
        shutil.rmtree(tmp)
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    os.rename(target, old)
    os.rename(tmp, target)
    shutil.rmtree(old)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temporaries(target: Path) -> list[Path]:
    """Remove ``.NAME.tmp-PID-*`` / ``.NAME.old-PID`` siblings whose writer process no longer runs.

    A run killed while writing (or between the swap and the clean-up) leaves such a directory;
    ``target`` itself is then the old or the new complete checkpoint. A live writer's are kept.
    """
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(?:tmp|old)-(\d+)(?:-.*)?")
    removed = []
    for path in target.parent.glob(f".{glob.escape(target.name)}.*"):
        match = pattern.fullmatch(path.name)
        if match and path.is_dir() and not path.is_symlink() and not process_alive(int(match[1])):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    if removed:
        log.info("removed %d stale temporary director%s beside %s", len(removed), "y" if len(removed) == 1 else "ies",
                 target)
    return removed


def copy_tokenizer(base_source: str | Path, into: Path, trust_remote_code: bool = False) -> bool:
    """Save the base's tokenizer beside the weights; a base without one is logged, not an error."""
    from transformers import AutoTokenizer

    try:
        AutoTokenizer.from_pretrained(str(base_source), trust_remote_code=trust_remote_code).save_pretrained(into)
        return True
    except (OSError, ValueError, KeyError) as e:
        log.warning("no tokenizer copied from %s: %s", base_source, str(e).splitlines()[0] if str(e) else e)
        return False


def save_folded(
    model: nn.Module,
    output_dir: str | Path,
    *,
    base_source: str | Path | None = None,
    experts: Mapping[str, str] | None = None,
    coefficients: Mapping[str, torch.Tensor] | None = None,
    coefficient_metadata: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
    details: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Mapping[str, float]] | None = None,
    overwrite: bool = False,
    max_shard_size: str | int = "5GB",
    trust_remote_code: bool = False,
    extra_files: Callable[[Path], None] | None = None,
) -> Path:
    """Write the folded checkpoint atomically and return its path.

    ``extra_files(tmp_dir)`` may add files (e.g. ``metrics.json``) or verify the written
    directory before it is moved into place; raising there leaves nothing behind.
    """
    target = check_output_dir(output_dir, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    try:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        if base_source is not None:
            copy_tokenizer(base_source, tmp, trust_remote_code)
        if coefficients is not None:
            save_coefficients(tmp / COEFFICIENTS_FILE, coefficients, coefficient_metadata or {})
        (tmp / CONFIG_FILE).write_text(yaml.safe_dump(dict(config or {}), sort_keys=False))
        card_details = {**(details or {}), "trust_remote_code": trust_remote_code}
        base_name = str(base_source) if base_source is not None else None
        (tmp / "README.md").write_text(model_card(base_name, experts or {}, card_details, metrics, coefficients,
                                                    config))
        if extra_files is not None:
            extra_files(tmp)
        replace_dir(tmp, target)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise AdamergeError(f"could not write output_dir={str(target)!r}: {e.strerror or e}") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
