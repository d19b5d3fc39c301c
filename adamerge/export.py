"""Write the folded checkpoint: a directory that loads with plain ``transformers``, written atomically.

Layout (docs/ARCHITECTURE.md): ``config.json``, ``model.safetensors`` (or shards + index), the base's tokenizer
files, ``README.md`` (model card), ``adamerge_coefficients.safetensors`` and ``adamerge_config.yaml``.
Everything is built in a temporary directory beside the target and renamed into place, so a crash
or a full disk leaves either the previous directory or the complete new one. The weights are written one
tensor at a time (``safetensors_io.write_pretrained``), each checked finite as it is written; given
``values``, each folded tensor is computed only then, so no folded model exists beside the base.
"""

from __future__ import annotations

import ctypes
import errno
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
from adamerge.safetensors_io import Produce, save_layout, write_pretrained
from adamerge.tensors import all_finite

log = logging.getLogger(__name__)

COEFFICIENTS_FILE = "adamerge_coefficients.safetensors"
CONFIG_FILE = "adamerge_config.yaml"


MARKER_KEY = "adamerge_output"
"""Top-level key of ``adamerge_config.yaml`` that marks a directory as written by adamerge: the only kind of
non-empty directory ``overwrite=true`` replaces. It also records the card details and the inputs' fingerprints."""
TEMPORARY_MARKER = ".adamerge-temporary"
"""File inside each temporary directory this program creates beside ``output_dir`` (JSON: pid, target);
stale-temporary clean-up removes only directories that hold it."""


def check_output_dir(output_dir: str | Path | None, overwrite: bool,
                     inputs: Mapping[str, str | Path] | None = None) -> Path:
    """The resolved ``output_dir``, refused up front (before any work) when writing it could destroy anything.

    Refused: an unset path; a path that is, or contains, one of ``inputs`` (role -> path: the base, experts,
    data files' directories, the run directory), the current or the home directory; a non-empty directory
    without ``overwrite``, or, with it, one that adamerge did not write; a place this process cannot write.
    A symlinked ``output_dir`` is written through: its target is replaced and the link kept.
    """
    if output_dir is None or not str(output_dir).strip():
        raise AdamergeError("output_dir is not set: output_dir=DIR (where the folded checkpoint goes)")
    path = Path(output_dir).expanduser()
    target = path.resolve()
    protected = {**(inputs or {}), "the current directory": Path.cwd(), "the home directory": Path.home()}
    protected = {role: Path(other).expanduser().resolve() for role, other in protected.items()}
    clash = next((("is", r, o) for r, o in protected.items() if target == o), None) or \
        next((("contains", r, o) for r, o in protected.items() if target in o.parents), None)
    if clash is not None:
        relation, role, other = clash
        raise AdamergeError(f"output_dir={str(path)!r} {relation} {role} ({other}); writing there could destroy "
                            "it: choose another output_dir")
    if target.exists() and not target.is_dir():
        raise AdamergeError(f"output_dir={str(path)!r} exists and is not a directory")
    if target.is_dir() and any(target.iterdir()):
        if not overwrite:
            raise AdamergeError(f"output_dir={str(path)!r} exists and is not empty; set overwrite=true to replace it")
        if not is_adamerge_output(target):
            raise AdamergeError(f"output_dir={str(path)!r} is not empty and was not written by adamerge (no "
                                f"{CONFIG_FILE} with its marker): overwrite=true replaces only an earlier adamerge "
                                "output or an empty directory")
    check_writable(target, path)
    return target


def is_adamerge_output(directory: Path) -> bool:
    """``directory`` holds an ``adamerge_config.yaml`` that carries this program's marker."""
    try:
        config = yaml.safe_load((directory / CONFIG_FILE).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return isinstance(config, dict) and isinstance(config.get(MARKER_KEY), dict)


def check_writable(target: Path, shown: Path) -> None:
    """Create (and remove) a probe file in the nearest existing directory of ``target``: a read-only or
    missing place is refused now, not after the training it would waste."""
    existing = next(p for p in (target, *target.parents) if p.exists())
    try:
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(existing))
        fd, probe = tempfile.mkstemp(prefix=".adamerge-probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise AdamergeError(f"output_dir={str(shown)!r} cannot be written ({existing}: {e.strerror or e})") from e


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


def mark_temporary(directory: Path, target: Path) -> None:
    (directory / TEMPORARY_MARKER).write_text(json.dumps({"pid": os.getpid(), "target": target.name}))


def replace_dir(tmp: Path, target: Path) -> None:
    """Move a finished ``tmp`` onto ``target``: atomic swap if possible, else two renames.

    The old checkpoint is marked as this program's temporary before it leaves ``target``, so that a run
    killed before removing it leaves something the next run may clean up.
    """
    (tmp / TEMPORARY_MARKER).unlink()
    if not target.exists():
        os.rename(tmp, target)
        return
    mark_temporary(target, target)
    try:
        if _exchange(tmp, target):
            shutil.rmtree(tmp)
            return
        old = target.with_name(f".{target.name}.old-{os.getpid()}-{os.urandom(4).hex()}")
        os.rename(target, old)
    except BaseException:
        (target / TEMPORARY_MARKER).unlink(missing_ok=True)
        raise
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


def stale_writer(directory: Path, target: Path) -> bool:
    """``directory`` is one of this program's temporaries for ``target`` and its writer no longer runs."""
    try:
        marker = json.loads((directory / TEMPORARY_MARKER).read_text())
    except (OSError, ValueError):
        return False  # not ours: never removed
    return (isinstance(marker, dict) and marker.get("target") == target.name and isinstance(marker.get("pid"), int)
            and not process_alive(marker["pid"]))


def remove_stale_temporaries(target: Path) -> list[Path]:
    """Remove ``.NAME.tmp-*`` / ``.NAME.old-*`` siblings that this program created and whose writer is gone.

    A run killed while writing (or between the swap and the clean-up) leaves such a directory;
    ``target`` itself is then the old or the new complete checkpoint. Only a directory holding the
    temporary marker written at its creation is removed; a live writer's, or a user's, are kept.
    """
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(?:tmp|old)-.*")
    removed = []
    for path in target.parent.glob(f".{glob.escape(target.name)}.*"):
        if pattern.fullmatch(path.name) and path.is_dir() and not path.is_symlink() and stale_writer(path, target):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    if removed:
        log.info("removed %d stale temporary director%s beside %s", len(removed), "y" if len(removed) == 1 else "ies",
                 target)
    return removed


def first_nonfinite(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding NaN or Inf, if any."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not all_finite(tensor):
            return name
    return None


def check_finite(what: str, tensors: Mapping[str, torch.Tensor], target: Path) -> None:
    """Refuse to write a checkpoint whose weights or coefficients are not finite (it would load and be garbage)."""
    bad = first_nonfinite(tensors)
    if bad is not None:
        raise AdamergeError(f"the {what} are not finite ({bad!r} holds NaN/Inf); nothing was written to "
                            f"output_dir={str(target)!r}")


def write_weights(directory: Path, model: nn.Module, values: Produce | None, max_shard_size: str | int,
                  target: Path) -> None:
    """``model``'s weights (or ``values(name, its tensor)``) as ``save_pretrained`` lays them out, one tensor at a
    time, each checked finite before it is written; a model whose tensors transformers converts on saving is
    checked whole, then saved by ``save_pretrained``."""
    if values is None and save_layout(model) is None:
        check_finite("merged weights", model.state_dict(), target)
        model.save_pretrained(directory, max_shard_size=max_shard_size)
        return

    def checked(name: str, tensor: torch.Tensor) -> torch.Tensor:
        value = tensor if values is None else values(name, tensor)
        check_finite("merged weights", {name: value}, target)
        return value

    write_pretrained(directory, model, checked, max_shard_size)


def copy_tokenizer(base_source: str | Path, into: Path, trust_remote_code: bool = False, tokenizer=None) -> bool:
    """Save ``tokenizer`` (the merged vocabulary where experts added tokens, ``adamerge/vocab.py``) or else the
    base's beside the weights; a base without one is logged, not an error."""
    from transformers import AutoTokenizer

    if tokenizer is not None:
        tokenizer.save_pretrained(into)
        return True
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
    protected: Mapping[str, str | Path] | None = None,
    record: Mapping[str, Any] | None = None,
    weights: Callable[[Path], None] | None = None,
    card: Mapping[str, Any] | None = None,
    tokenizer=None,
    values: Produce | None = None,
) -> Path:
    """Write the folded checkpoint atomically and return its path.

    ``extra_files(tmp_dir)`` may add files (e.g. ``metrics.json``) or verify the written
    directory before it is moved into place; raising there leaves nothing behind. ``protected``
    (role -> path) are inputs ``output_dir`` must not be or contain (see ``check_output_dir``);
    ``record`` goes under the marker key of ``adamerge_config.yaml`` (card details, input fingerprints).
    ``weights(tmp_dir)`` writes the weights instead of ``model.save_pretrained`` (a LoRA adapter of the
    merge, ``lora_output.py``); ``card`` holds more keyword arguments of ``card.model_card``; ``tokenizer``
    is written instead of the base's (experts' added tokens). ``values(name, tensor)`` gives the tensor written for
    each of ``model``'s (the fold computed tensor by tensor, ``MergedModel.folded_tensor``; ``model`` is then the
    base, whose config and layout are written).
    Non-finite weights or coefficients are refused: nothing is written.
    """
    target = check_output_dir(output_dir, overwrite, protected)
    check_finite("coefficients", coefficients or {}, target)
    card_details = {**(details or {}), "trust_remote_code": trust_remote_code}
    tmp: Path | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
        mark_temporary(tmp, target)
        if weights is None:
            write_weights(tmp, model, values, max_shard_size, target)
        else:
            weights(tmp)
        if base_source is not None:
            copy_tokenizer(base_source, tmp, trust_remote_code, tokenizer)
        if coefficients is not None:
            save_coefficients(tmp / COEFFICIENTS_FILE, coefficients, coefficient_metadata or {})
        marker = {"format": 1, "details": card_details, **(record or {})}
        (tmp / CONFIG_FILE).write_text(yaml.safe_dump({**dict(config or {}), MARKER_KEY: marker}, sort_keys=False))
        base_name = str(base_source) if base_source is not None else None
        (tmp / "README.md").write_text(model_card(base_name, experts or {}, card_details, metrics, coefficients,
                                                    config, **(card or {})))
        if extra_files is not None:
            extra_files(tmp)
        replace_dir(tmp, target)
    except OSError as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise AdamergeError(f"could not write output_dir={str(target)!r}: {e.strerror or e}") from e
    except BaseException:  # SIGINT/SIGTERM (raised by the CLI's handlers) included: nothing partial is left
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
