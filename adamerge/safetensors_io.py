"""Safetensors checkpoints tensor by tensor: experts read lazily from their files, the fold written shard by shard.

Why: ``from_pretrained`` builds a whole ``nn.Module`` per expert (a model's worth of memory and
time) only for the pool to subtract the base from each tensor and drop it, and ``save_pretrained``
wants the folded model as a second module beside the base, then serializes each shard into one
more buffer. Here an expert stays its files: the headers give every name, shape and dtype (checked
against the base's before any data is read), and each tensor is read from its shard (``safe_open``)
only when its task vector is written. The fold is written the same way: shards and index laid out
as ``save_pretrained`` lays them out (its own tied-weight removal and shard split), each tensor
computed, checked and written while the others do not exist.

Local directories and hub ids found in the local cache (never downloaded here) are read this way;
``pool.py`` says where a module is still built.
"""

from __future__ import annotations

import copy
import json
import struct
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from adamerge.errors import AdamergeError

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives and what its header declares."""

    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype | None  # None: a dtype torch has no name for here


# ---- reading ------------------------------------------------------------------------------------------------


def weight_files(path: Path) -> list[Path]:
    """The safetensors files ``from_pretrained`` reads: the shards the index names, else ``model.safetensors``
    (none: a checkpoint in another form, which ``from_pretrained`` reads or refuses)."""
    index = path / INDEX_NAME
    if index.is_file():
        return [path / name for name in dict.fromkeys(sorted(read_index(index, path).values()))]
    return [path / WEIGHTS_NAME] if (path / WEIGHTS_NAME).is_file() else []


def read_index(index: Path, path: Path) -> dict[str, str]:
    """``weight_map`` (tensor name -> shard file name) of a sharded checkpoint's index."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise AdamergeError(f"{str(index)!r} is not a safetensors index (JSON with a weight_map)") from e
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) and "/" not in f for f in weight_map.values()):
        raise AdamergeError(f"{str(index)!r}: its weight_map must map tensor names to file names in {str(path)!r}")
    return weight_map


def read_layout(path: Path, role: str) -> dict[str, TensorEntry]:
    """Tensor name -> (file, shape, dtype) of a checkpoint directory, from its headers alone (lazy ``safe_open``,
    which also refuses a truncated file or a header whose offsets disagree with the shapes). A sharded
    checkpoint's index must name shards that exist and hold the tensors it says they hold."""
    from safetensors import SafetensorError, safe_open

    layout: dict[str, TensorEntry] = {}
    for file in weight_files(path):
        if not file.is_file():
            raise AdamergeError(f"{role}: shard {file.name!r} named by {INDEX_NAME} is missing from {str(path)!r}")
        try:
            with safe_open(str(file), "pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    header = f.get_slice(name)
                    layout[name] = TensorEntry(file, tuple(header.get_shape()), DTYPES.get(header.get_dtype()))
        except (SafetensorError, OSError) as e:
            raise AdamergeError(f"{role}: {str(file)!r} is damaged or truncated ({e})") from e
    if (path / INDEX_NAME).is_file():
        wrong = next(((n, f) for n, f in read_index(path / INDEX_NAME, path).items()
                      if n not in layout or layout[n].file.name != f), None)
        if wrong is not None:
            raise AdamergeError(f"{role}: {INDEX_NAME} puts {wrong[0]!r} in {wrong[1]!r}, which does not hold it")
    return layout


class LazyTensors(MutableMapping):
    """A checkpoint's tensors by name, each read from its file when asked for (and not kept), floating-point ones
    cast to ``dtypes[name]`` where given. Assigned values (an expert's trimmed vocabulary rows) are kept and
    shadow the file's. The file is opened for each read: ``safe_open`` maps the whole file, and the pages a read
    touches count in the process's resident memory until it is closed (a whole expert, otherwise)."""

    def __init__(self, layout: Mapping[str, TensorEntry], names: list[str] | None = None,
                 dtypes: Mapping[str, torch.dtype] | None = None) -> None:
        self.layout = {n: layout[n] for n in (names if names is not None else layout)}
        self.dtypes = dict(dtypes or {})
        self.assigned: dict[str, torch.Tensor] = {}

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.assigned[name].shape) if name in self.assigned else self.layout[name].shape

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self.assigned:
            return self.assigned[name]
        from safetensors import safe_open

        with safe_open(str(self.layout[name].file), "pt") as f:
            tensor = f.get_tensor(name)
        dtype = self.dtypes.get(name)
        return tensor if dtype is None or not tensor.is_floating_point() else tensor.to(dtype)

    def __setitem__(self, name: str, value: torch.Tensor) -> None:
        self.assigned[name] = value

    def __delitem__(self, name: str) -> None:
        self.assigned.pop(name, None)
        del self.layout[name]

    def __contains__(self, name: object) -> bool:
        """From the layout (Mapping's default would read the tensor to find out)."""
        return name in self.assigned or name in self.layout

    def __iter__(self) -> Iterator[str]:
        return iter(self.layout)

    def __len__(self) -> int:
        return len(self.layout)

    def clear(self) -> None:
        """Forget the assigned tensors (the files are not held open)."""
        self.assigned.clear()


def cached_snapshot(repo_id: str) -> Path | None:
    """The local snapshot of a hub model that is already in the cache (never downloads), or None."""
    try:
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # noqa: BLE001 (not cached, not a valid id, no hub library: the caller loads it as before)
        return None
    return path if (path / "config.json").is_file() and weight_files(path) else None


# ---- writing ------------------------------------------------------------------------------------------------


def save_layout(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """What ``model.save_pretrained`` would write (tied copies and ignored keys dropped, by transformers' own
    rules), as the model's own tensors in the order it writes them; None where transformers would convert or rename
    tensors on saving, or copy custom code (then ``save_pretrained`` itself writes)."""
    try:
        from transformers import PreTrainedModel
        from transformers.core_model_loading import revert_weight_conversion
        from transformers.modeling_utils import remove_tied_weights_from_state_dict
    except ImportError:
        return None
    if not isinstance(model, PreTrainedModel) or model.is_remote_code():
        return None
    state = model.state_dict()
    for key in model._keys_to_ignore_on_save or ():
        state.pop(key, None)
    state = remove_tied_weights_from_state_dict(state, model)
    reverted = revert_weight_conversion(model, dict(state))  # in the order it writes (sorted for loaded models)
    if set(reverted) != set(state) or any(reverted[n] is not state[n] for n in state):
        return None
    return reverted


Produce = Callable[[str, torch.Tensor], torch.Tensor]  # (name, the model's tensor) -> the value written for it


def write_pretrained(directory: Path, model: nn.Module, value: Produce | None = None,
                     max_shard_size: str | int = "5GB") -> list[Path]:
    """Write ``model`` as ``save_pretrained`` would (config, generation config, ``model.safetensors`` or shards +
    ``model.safetensors.index.json``), one tensor at a time: ``value(name, tensor)`` gives what is written for each
    state-dict entry (default: the tensor itself); it must keep its shape and dtype. Returns the weight files."""
    state = save_layout(model)
    if state is None:
        if value is not None:
            raise AdamergeError(f"{type(model).__name__} renames or converts its tensors when saved; write it as a "
                                "module (save_pretrained)")
        model.save_pretrained(directory, max_shard_size=max_shard_size)
        return weight_files(directory)
    from huggingface_hub import split_torch_state_dict_into_shards

    config = copy.deepcopy(model.config)
    config.dtype = str(model.dtype).split(".")[1]
    config.architectures = [type(model).__name__]
    config.save_pretrained(directory)
    if model.can_generate():
        model.generation_config.save_pretrained(directory)
    split = split_torch_state_dict_into_shards(state, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=max_shard_size)
    files = []
    for file, names in split.filename_to_tensors.items():
        files.append(directory / file)
        write_safetensors(files[-1], {n: state[n] for n in names}, value)
    if split.is_sharded:
        index = {"metadata": {"total_parameters": model.num_parameters(), **split.metadata},
                 "weight_map": split.tensor_to_filename}
        (directory / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return files


def write_safetensors(path: Path, templates: Mapping[str, torch.Tensor], value: Produce | None = None) -> None:
    """One safetensors file, its header built from the templates' shapes and dtypes before any value exists, then
    each value written straight from its tensor's memory. Larger elements first, so every tensor stays aligned."""
    names = sorted(templates, key=lambda n: -templates[n].element_size())
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        t = templates[name]
        size = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name in names:
            tensor = templates[name] if value is None else value(name, templates[name])
            if tensor.shape != templates[name].shape or tensor.dtype != templates[name].dtype:
                raise ValueError(f"{name}: {tuple(tensor.shape)} {tensor.dtype} written where the header says "
                                 f"{tuple(templates[name].shape)} {templates[name].dtype}")
            write_tensor(f, tensor)
            del tensor  # before the next value is computed: one at a time


def write_tensor(f, tensor: torch.Tensor) -> None:
    """The tensor's bytes (little-endian, C order), without a copy where it is contiguous on the CPU."""
    tensor = tensor.detach().to("cpu").contiguous()
    if tensor.numel():
        f.write(tensor.reshape(-1).view(torch.uint8).numpy())
