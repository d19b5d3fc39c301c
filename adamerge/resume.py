"""``resume=``: the checkpoint read as data and checked against this run before any model is loaded, and its
tensors against the run's trainable ones before Lightning starts (so a mismatch writes nothing)."""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from adamerge.errors import AdamergeError


def read_resume(path: str | Path, experts: Sequence[str], granularity: str | None = None) -> dict:
    """The checkpoint named by ``resume=``, read as data (``weights_only=True``: a pickle that carries code is
    refused) and checked against this run's experts, before any model is loaded."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise AdamergeError(f"resume={str(path)!r} does not exist")
    if not zipfile.is_zipfile(path):
        raise AdamergeError(f"resume={str(path)!r} is not a checkpoint (not a torch.save archive)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        why = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line), "it holds more than tensors")
        raise AdamergeError(f"resume={str(path)!r}: torch.load(weights_only=True) refuses it: {why}") from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise AdamergeError(f"resume={str(path)!r} is not a checkpoint ({str(e).splitlines()[0] if str(e) else e})") \
            from e
    if not isinstance(checkpoint, Mapping) or not isinstance(checkpoint.get("state_dict"), Mapping):
        raise AdamergeError(f"resume={str(path)!r} is not a Lightning checkpoint (no state_dict)")
    saved = checkpoint.get("adamerge") or {}
    if saved.get("experts") is not None and list(saved["experts"]) != list(experts):
        raise AdamergeError(f"resume={str(path)!r} was saved by a run with experts {list(saved['experts'])}; this "
                            f"run has {list(experts)}")
    if granularity is not None and saved.get("granularity") not in (None, granularity):
        raise AdamergeError(f"resume={str(path)!r} was saved by a run with granularity {saved['granularity']}; this "
                            f"run has {granularity}")
    return checkpoint


def check_resume_fits(checkpoint: Mapping, trainable: Mapping[str, torch.Tensor]) -> None:
    """The resumed tensors are exactly this run's trainable ones (names and shapes): another granularity or
    other experts would otherwise fail deep in Lightning, or half-load."""
    saved = checkpoint["state_dict"]
    missing = sorted(set(trainable) - set(saved))
    extra = sorted(set(saved) - set(trainable))
    if missing or extra:
        name = (missing or extra)[0]
        raise AdamergeError(f"resume checkpoint does not fit this run: {name!r} is "
                            f"{'missing from the checkpoint' if missing else 'not a coefficient of this run'} "
                            "(another granularity, objective or set of experts?)")
    for name, tensor in trainable.items():
        if tuple(saved[name].shape) != tuple(tensor.shape):
            raise AdamergeError(f"resume checkpoint does not fit this run: {name!r} has shape "
                                f"{tuple(saved[name].shape)}, this run {tuple(tensor.shape)}")
