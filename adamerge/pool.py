"""ExpertPool: a frozen base model and K named experts, read one expert at a time.

Experts come from a local Hugging Face directory, a hub id, a PEFT LoRA adapter directory on top
of the base, an in-memory ``nn.Module``, or a zero-argument callable that builds one. An expert is
only ever materialized while its task vector is being written (see the memory model in DESIGN.md).
"""

from __future__ import annotations

import copy
import logging
import pickle
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from adamerge.errors import AdamergeError

log = logging.getLogger(__name__)

Source = str | Path | nn.Module | Callable[[], nn.Module]

# Modules whose weight is stored (in_features, out_features) instead of nn.Linear's (out, in).
INPUT_FIRST_MODULES = {"Conv1D"}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
# Task heads of classification models (BERT/RoBERTa/DistilBERT ``classifier``, decoders' ``score``).
DEFAULT_HEADS = (r"^(classifier|score|pre_classifier)\.",)


@dataclass(frozen=True)
class TensorInfo:
    """What a granularity needs to know about one merged tensor."""

    name: str
    shape: tuple[int, ...]
    kind: str  # "matrix" (>= 2-D), "norm" (1-D of a norm/embedding module), "bias" or "vector"
    feature_dim: int | None  # axis of input features (matrix) or hidden dims (norm/vector); None for bias


def describe_tensor(model: nn.Module, name: str, param: torch.Tensor) -> TensorInfo:
    """Classify a parameter by its owning module, the small table that replaces per-family code."""
    module_name, _, leaf = name.rpartition(".")
    owner = type(model.get_submodule(module_name)).__name__ if module_name else type(model).__name__
    shape = tuple(param.shape)
    if param.dim() >= 2:
        return TensorInfo(name, shape, "matrix", 0 if owner in INPUT_FIRST_MODULES else 1)
    if "norm" in owner.lower():
        return TensorInfo(name, shape, "norm", 0)
    if leaf == "bias":
        return TensorInfo(name, shape, "bias", None)
    return TensorInfo(name, shape, "vector", 0)


def resolve_auto_class(auto_class: str | type) -> type:
    """Map a config string such as ``AutoModelForCausalLM`` to the transformers class (Auto* only)."""
    if not isinstance(auto_class, str):
        return auto_class
    import transformers

    if not auto_class.startswith("Auto") or not hasattr(transformers, auto_class):
        raise AdamergeError(f"pool.auto_class={auto_class!r} is not a transformers Auto class")
    return getattr(transformers, auto_class)


def is_local(source: str | Path) -> bool:
    """A source is a local path if it exists or is written like one; otherwise a hub id."""
    text = str(source)
    return Path(text).expanduser().exists() or text.startswith(("/", "./", "../", "~")) or text.count("/") > 1


class ExpertPool:
    """A frozen base and named expert sources; ``task_vectors()`` turns them into stacked deltas.

    Args:
        base: the base model (source as for experts, but not a LoRA adapter).
        experts: task name -> source. The name is the task's name everywhere (data, metrics, logs).
        auto_class: transformers Auto class used for directories and hub ids.
        include / exclude: regexes over parameter names choosing what is merged
            (default: every floating-point parameter). Unmerged tensors keep the base's values.
        trust_remote_code: passed to transformers; off unless the user turns it on.
        allow_pickle: read ``.bin`` checkpoints with ``torch.load(weights_only=True)``; off by default.
        dtype: dtype to load models in (``None``: as stored).
        heads: regexes marking per-task head parameters: never merged, may differ in shape across
            experts, each expert's kept beside the task vectors. Default: ``DEFAULT_HEADS`` for
            classification Auto classes, none otherwise.
    """

    def __init__(
        self,
        base: Source,
        experts: Mapping[str, Source],
        *,
        auto_class: str | type = "AutoModelForCausalLM",
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
        trust_remote_code: bool = False,
        allow_pickle: bool = False,
        dtype: torch.dtype | None = None,
        heads: Sequence[str] | None = None,
    ) -> None:
        if len(experts) < 1:
            raise AdamergeError("the pool needs at least one expert: set pool.experts.NAME=DIR_OR_ID")
        if len(experts) == 1:
            log.warning("only one expert: merging will interpolate between the base and that expert")
        self.auto_class = resolve_auto_class(auto_class)
        self.trust_remote_code = trust_remote_code
        self.allow_pickle = allow_pickle
        self.dtype = dtype
        self.base_source = base if isinstance(base, (str, Path)) else None
        self.base = self._load_model(base, role="base")
        self.base.requires_grad_(False).eval()
        self.expert_sources = dict(experts)
        for name, source in self.expert_sources.items():  # fail before any expert is loaded
            if isinstance(source, (str, Path)) and is_local(source):
                self._check_local_source(Path(source).expanduser(), f"expert {name!r}")
        if heads is None:
            heads = DEFAULT_HEADS if "Classification" in self.auto_class.__name__ else ()
        self.head_names = [n for n, _ in self.base.named_parameters() if any(re.search(rx, n) for rx in heads)]
        self.expert_configs: dict[str, object] = {}
        self.merged_names = [n for n in self._select(include, exclude) if n not in self.head_names]
        if not self.merged_names:
            raise AdamergeError("no parameter matches pool.include/pool.exclude: nothing to merge")

    @property
    def expert_names(self) -> list[str]:
        return list(self.expert_sources)

    def tensor_infos(self) -> list[TensorInfo]:
        params = dict(self.base.named_parameters())
        return [describe_tensor(self.base, name, params[name]) for name in self.merged_names]

    def _select(self, include: Sequence[str], exclude: Sequence[str]) -> list[str]:
        """Floating-point parameters matching include (if any) and no exclude; tied copies appear once."""
        return [
            name
            for name, p in self.base.named_parameters()
            if p.is_floating_point()
            and (not include or any(re.search(rx, name) for rx in include))
            and not any(re.search(rx, name) for rx in exclude)
        ]

    def iter_experts(self) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
        """Yield (name, merged and head parameters) for one expert at a time; the expert is dropped after.

        The yielded dict is emptied when the next expert is requested: the caller's loop variable, or
        an ``enumerate`` around this generator (it keeps its last result), cannot keep the previous
        expert alive while the next one loads.
        """
        for name, source in self.expert_sources.items():
            expert = self._load_model(source, role=f"expert {name!r}")
            params = dict(expert.named_parameters())
            self._check_matches_base(name, params)
            self.expert_configs[name] = getattr(expert, "config", None)
            tensors = {n: params[n].detach() for n in (*self.merged_names, *self.head_names)}
            del expert, params
            yield name, tensors
            tensors.clear()
            del tensors

    def task_vectors(self, dtype: torch.dtype | None = None, device: str | torch.device | None = None):
        """Stack ``W_k - W0`` for every merged tensor into ``(K, *shape)``, one expert in memory at a time."""
        from adamerge.taskvectors import TaskVectors

        base = dict(self.base.named_parameters())
        stacks = {
            n: torch.empty((len(self.expert_sources), *base[n].shape), dtype=dtype or base[n].dtype, device=device)
            for n in self.merged_names
        }
        heads: dict[str, dict[str, torch.Tensor]] = {}
        for k, (name, params) in enumerate(self.iter_experts()):
            for n, stack in stacks.items():
                stack[k].copy_(params[n].to(base[n].device) - base[n])
            if self.head_names:
                heads[name] = {n: params[n].detach().clone().to(base[n].device) for n in self.head_names}
        infos = {i.name: i for i in self.tensor_infos()}
        return TaskVectors(self.expert_names, infos, stacks, heads, dict(self.expert_configs) if heads else {})

    def _check_matches_base(self, expert: str, params: Mapping[str, torch.Tensor]) -> None:
        base = dict(self.base.named_parameters())
        for n, p in base.items():
            if n not in params:
                raise AdamergeError(f"expert {expert!r} has no tensor {n!r} that the base has")
            if n in self.head_names:
                continue  # heads may differ in shape (different label sets)
            if params[n].shape != p.shape:
                raise AdamergeError(
                    f"expert {expert!r}: tensor {n!r} has shape {tuple(params[n].shape)}, the base {tuple(p.shape)}"
                )
            if params[n].dtype != p.dtype:
                raise AdamergeError(f"expert {expert!r}: tensor {n!r} is {params[n].dtype}, the base {p.dtype}")
        extra = next((n for n in params if n not in base), None)
        if extra is not None:
            raise AdamergeError(f"expert {expert!r} has a tensor {extra!r} that the base does not have")

    def check_tokenizers(self, base_tokenizer) -> list[str]:
        """Warn about local experts that ship a tokenizer whose vocabulary differs from the base's.

        Calibration data is tokenized with the base's tokenizer for every expert, so such an expert
        sees other token ids than it was trained on. A warning, not an error: many experts ship no
        tokenizer, and one that only adds tokens also fails the shape check of the embeddings.
        Returns the names of the experts warned about.
        """
        from transformers import AutoTokenizer

        base_vocab, mismatched = base_tokenizer.get_vocab(), []
        for name, source in self.expert_sources.items():
            if not isinstance(source, (str, Path)) or not is_local(source):
                continue
            path = Path(source).expanduser()
            if not any((path / f).is_file() for f in TOKENIZER_FILES):
                continue
            try:
                vocab = AutoTokenizer.from_pretrained(str(path), trust_remote_code=self.trust_remote_code).get_vocab()
            except (OSError, ValueError, KeyError) as e:
                log.warning("expert %r: its tokenizer could not be read (%s); using the base's", name, e)
                mismatched.append(name)
                continue
            if vocab != base_vocab:
                log.warning("expert %r: its tokenizer's vocabulary differs from the base's (%d vs %d tokens, %d "
                            "differ); calibration data is tokenized with the base's", name, len(vocab),
                            len(base_vocab), len(set(vocab.items()) ^ set(base_vocab.items())))
                mismatched.append(name)
        return mismatched

    # ---- loading -------------------------------------------------------------------------

    def _load_model(self, source: Source, role: str) -> nn.Module:
        if isinstance(source, nn.Module):
            return source
        if callable(source):
            return source()
        if is_local(source):
            path = Path(source).expanduser()
            self._check_local_source(path, role)
            if (path / "adapter_config.json").exists():
                return self._load_lora(path)
        return self._from_pretrained(str(source), role)

    def _check_local_source(self, path: Path, role: str) -> None:
        """A local source must be a model directory (or, for an expert, a LoRA adapter) we may read."""
        if not path.exists():
            raise AdamergeError(f"{role}: path {str(path)!r} does not exist")
        if (path / "adapter_config.json").exists():
            if role == "base":
                raise AdamergeError(f"base: {str(path)!r} is a LoRA adapter, not a model")
            return
        if not (path / "config.json").exists():
            raise AdamergeError(
                f"{role}: {str(path)!r} is not a model directory (no config.json or adapter_config.json)"
            )
        self._check_weight_format(path, role)

    def _check_weight_format(self, path: Path, role: str) -> None:
        files = [f.name for f in path.iterdir()]
        if any(f.endswith(".safetensors") for f in files):
            return
        pickles = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
        if pickles and not self.allow_pickle:
            raise AdamergeError(
                f"{role}: {str(path)!r} only has pickle weights ({pickles[0]}); set pool.allow_pickle=true "
                "to read them with torch.load(weights_only=True)"
            )
        if not pickles:
            raise AdamergeError(f"{role}: {str(path)!r} has no weights (*.safetensors)")

    def _from_pretrained(self, source: str, role: str) -> nn.Module:
        kwargs = {"trust_remote_code": self.trust_remote_code, "use_safetensors": None if self.allow_pickle else True}
        if self.dtype is not None:
            kwargs["dtype"] = self.dtype
        try:
            return self.auto_class.from_pretrained(source, **kwargs)
        except pickle.UnpicklingError as e:  # torch.load(weights_only=True) met more than tensors
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            why = next((line for line in lines if "GLOBAL" in line), lines[0] if lines else type(e).__name__)
            raise AdamergeError(f"{role}: {source!r} has a pickle that torch.load(weights_only=True) refuses: {why}") \
                from e
        except (OSError, ValueError) as e:
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if "trust_remote_code" in str(e):
                raise AdamergeError(
                    f"{role}: {source!r} needs custom code; set pool.trust_remote_code=true only if you trust it"
                ) from e
            where = "" if is_local(source) else " (not a local path; is the hub reachable, or HF_HUB_OFFLINE set?)"
            raise AdamergeError(f"{role}: cannot load {source!r}{where}: {first_line}") from e

    def _load_lora(self, path: Path) -> nn.Module:
        """A LoRA expert = base + B A scaled, merged by peft itself into a private copy of the base."""
        from peft import PeftModel

        try:
            peft_model = PeftModel.from_pretrained(copy.deepcopy(self.base), str(path), is_trainable=False)
        except (OSError, ValueError, RuntimeError) as e:
            raise AdamergeError(f"LoRA adapter {str(path)!r} does not fit the base: {e}") from e
        return peft_model.merge_and_unload()
