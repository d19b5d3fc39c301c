"""ExpertPool: a frozen base model and K named experts, read one expert at a time.

Experts come from a local Hugging Face directory, a hub id, a PEFT LoRA adapter directory on top
of the base, an in-memory ``nn.Module``, or a zero-argument callable that builds one. A full
checkpoint in safetensors files (a local directory, or a hub id's snapshot already in the local
cache) is never built as a module: its headers are checked against the base's before anything is
loaded, and each tensor is read from its file while its task vector is written
(``safetensors_io.py``). A module is still built for LoRA adapters, per-task heads (classifiers,
which need each expert's config), ``task_model`` (CLIP zero-shot heads), pickle checkpoints,
checkpoints whose tensor names differ from the base's module (transformers renames them on loading),
and in-memory modules or builders; it exists only while its task vector is written
(docs/ARCHITECTURE.md, "Memory model"). A LoRA adapter's task vectors stay its factors, never an
(out x in) delta per expert. Experts whose tokenizers added tokens are trimmed to the base's
vocabulary rows, their added rows kept aside (``adamerge/vocab.py``).
"""

from __future__ import annotations

import copy
import json
import logging
import pickle
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from adamerge.errors import AdamergeError
from adamerge.safetensors_io import LazyTensors, TensorEntry, cached_snapshot, read_layout
from adamerge.taskvectors import LoraFactors, TaskVectors
from adamerge.tensors import TensorInfo, all_finite, describe_tensor
from adamerge.validate import check_task_names
from adamerge.vocab import Vocabulary, has_tokenizer_files, vocabulary_tensors

log = logging.getLogger(__name__)

Source = str | Path | nn.Module | Callable[[], nn.Module]
Factors = tuple[torch.Tensor, torch.Tensor]  # (left, right): a LoRA delta is left @ right

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# Task heads of classification models (BERT/RoBERTa/DistilBERT ``classifier``, decoders' ``score``).
DEFAULT_HEADS = (r"^(classifier|score|pre_classifier)\.",)


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
        task_model: ``(task, loaded model) -> model`` applied to the base (task ``None``) and to each
            expert as it is loaded, e.g. ``adamerge.zeroshot.ZeroShotTasks`` (CLIP vision tower +
            zero-shot head of that task).
        tokenizer: the merged vocabulary where experts added tokens (``adamerge/vocab.py``): ``union``,
            ``base`` or an expert's name.
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
        task_model: Callable[[str | None, nn.Module], nn.Module] | None = None,
        tokenizer: str = "union",
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
        self.expert_sources = {name: source for name, source in zip(check_task_names(experts), experts.values(),
                                                                     strict=True)}
        self.vocabulary = Vocabulary(tokenizer, self.expert_names)
        self.layouts: dict[str, dict[str, TensorEntry]] = {}  # expert -> its files' tensors (read_layout)
        self.check_sources()  # before the base or any expert is loaded
        self.vocabulary.read(self.base_source, self.expert_sources, trust_remote_code)
        self.base = self._load_model(base, role="base")
        self.base.requires_grad_(False).eval()
        self.task_model = task_model
        if task_model is not None:
            self.base = task_model(None, self.base).requires_grad_(False).eval()
        if heads is None:
            heads = DEFAULT_HEADS if "Classification" in self.auto_class.__name__ else ()
        self.head_names = [n for n, _ in self.base.named_parameters() if any(re.search(rx, n) for rx in heads)]
        self.expert_configs: dict[str, object] = {}
        self.vocab_names = vocabulary_tensors(self.base)  # rows indexed by token id (embeddings, lm_head)
        self.merged_names = [n for n in self._select(include, exclude) if n not in self.head_names]
        if not self.merged_names:
            raise AdamergeError("no parameter matches pool.include/pool.exclude: nothing to merge")

    @property
    def expert_names(self) -> list[str]:
        return list(self.expert_sources)

    def vocab_rows(self) -> int:
        """The base's vocabulary rows (0 for a model without token embeddings)."""
        return dict(self.base.named_parameters())[self.vocab_names[0]].shape[0] if self.vocab_names else 0

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

    def iter_experts(self) -> Iterator[tuple[str, dict[str, torch.Tensor], dict[str, Factors]]]:
        """Yield (name, merged and head parameters, LoRA factors) for one expert at a time; it is dropped after.

        A LoRA adapter's targeted weights come as factors (``left @ right`` = its delta) and, of the
        merged tensors, only those it changes otherwise (``modules_to_save``, trained biases); a
        full expert gives every merged tensor. The yielded dicts are emptied when the next expert is
        requested: the caller's loop variables, or an ``enumerate`` around this generator (it keeps
        its last result), cannot keep the previous expert alive while the next one loads.
        """
        base = dict(self.base.named_parameters())
        for name, source in self.expert_sources.items():
            lazy = self._expert_files(name)
            if lazy is not None:
                yield name, lazy, {}
                lazy.clear()
                continue
            expert = self._load_model(source, role=f"expert {name!r}")
            lora = is_adapter(source)
            model, layers = unload_lora(expert, name) if lora else (expert, {})
            if self.task_model is not None:
                model = self.task_model(name, model)
            factors = {f"{n}.weight": layers[id(m)] for n, m in model.named_modules() if id(m) in layers}
            params = dict(model.named_parameters())
            self._check_matches_base(name, {n: (tuple(p.shape), p.dtype) for n, p in params.items()})
            self.vocabulary.keep_rows(name, params, self.vocab_names, self.vocab_rows())
            self.expert_configs[name] = getattr(model, "config", None)
            changed = [n for n in self.merged_names if not (lora and torch.equal(params[n], base[n]))]
            tensors = {n: params[n].detach() for n in (*changed, *self.head_names)}
            del expert, model, params
            yield name, tensors, factors
            tensors.clear()
            factors.clear()
            del tensors, factors

    def _expert_files(self, name: str) -> LazyTensors | None:
        """Expert ``name`` as its safetensors files, each tensor read when asked for, where no module is needed:
        a full checkpoint of the base's model type (no custom code) holding every parameter of the base under the
        base's names, no per-task heads, no ``task_model``. Its names, shapes and dtypes are checked against the
        base's here, before any data is read."""
        layout = self.layouts.get(name)
        params = dict(self.base.named_parameters())
        if layout is None or self.head_names or self.task_model is not None or any(n not in layout for n in params):
            return None
        config, base_type = read_config(next(iter(layout.values())).file.parent), getattr(self.base, "config", None)
        if "auto_map" in config or config.get("model_type") != getattr(base_type, "model_type", None):
            return None  # transformers decides (custom code needs pool.trust_remote_code)
        tensors = LazyTensors(layout, list(params), {n: p.dtype for n, p in params.items()})  # read as the base's
        self._check_matches_base(name, {n: (tensors.shape(n), p.dtype) for n, p in params.items()})  # dtypes: headers
        if self.vocab_names and (tensors.shape(self.vocab_names[0])[0] > self.vocab_rows()
                                 or self.vocabulary.added.get(name)):
            self.vocabulary.keep_rows(name, tensors, self.vocab_names, self.vocab_rows())
        return tensors

    def task_vectors(self, dtype: torch.dtype | None = None, device: str | torch.device | None = None,
                     pin_memory: bool = False):
        """Task vectors of every merged tensor, one expert in memory at a time.

        Dense stacks ``W_k - W0`` of shape ``(K, *shape)`` (zero rows for experts that leave a
        tensor alone), LoRA factors where every expert changing a tensor is LoRA, and nothing for
        a tensor no expert changes. ``pin_memory``: page-locked host stacks for ``pool.offload``.
        """
        base, k_total = dict(self.base.named_parameters()), len(self.expert_sources)
        stacks: dict[str, torch.Tensor] = {}
        filled: dict[str, set[int]] = {}
        parts: dict[str, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
        heads: dict[str, dict[str, torch.Tensor]] = {}
        for k, (name, params, factors) in enumerate(self.iter_experts()):
            check_finite_expert(name, {n: params[n] for n in self.head_names}, factors)
            for n in self.merged_names:
                if n not in params:
                    continue
                value = params[n]  # an expert read from its files: this tensor alone, read now
                check_finite_expert(name, {n: value}, {})
                if n not in stacks:
                    stacks[n] = torch.empty((k_total, *base[n].shape), dtype=dtype or base[n].dtype, device=device,
                                            pin_memory=pin_memory)
                torch.sub(value.to(base[n].device), base[n], out=stacks[n][k])  # no full-size temporary
                filled.setdefault(n, set()).add(k)
                del value
            for n, (left, right) in factors.items():
                kw = {"dtype": dtype or base[n].dtype, "device": device or base[n].device, "copy": True}
                parts.setdefault(n, []).append((k, left.to(**kw), right.to(**kw)))
            if self.head_names:
                heads[name] = {n: params[n].detach().clone().to(base[n].device) for n in self.head_names}
        for n, stack in stacks.items():
            for k in set(range(k_total)) - filled[n]:
                stack[k].zero_()
        mixed = [n for n in parts if n in stacks]
        if mixed:
            log.info("LoRA task vectors of %d tensor(s) densified: full experts change them too (factor space "
                     "needs every expert changing a tensor to be LoRA)", len(mixed))
        for n in mixed:
            for k, left, right in parts.pop(n):
                stacks[n][k].add_(left @ right)
        infos = {i.name: i for i in self.tensor_infos()}
        return TaskVectors(self.expert_names, infos, {n: stacks[n] for n in self.merged_names if n in stacks},
                           heads, dict(self.expert_configs) if heads else {},
                           factors={n: stack_factors(parts[n], k_total) for n in self.merged_names if n in parts},
                           base={n: base[n].detach() for n in self.merged_names},
                           added=self.vocabulary.added_rows(self.vocab_rows()))

    def _check_matches_base(self, expert: str, params: Mapping[str, tuple[tuple[int, ...], torch.dtype | None]]
                            ) -> None:
        """The expert's parameters (name -> (shape, dtype)) are the base's: same names, shapes and dtypes."""
        base = dict(self.base.named_parameters())
        for n, p in base.items():
            if n not in params:
                raise AdamergeError(f"expert {expert!r} has no tensor {n!r} that the base has")
            if n in self.head_names:
                continue  # heads may differ in shape (different label sets)
            shape, dtype = params[n]
            if n in self.vocab_names and shape[1:] == p.shape[1:] and shape[0] > p.shape[0]:
                continue  # added tokens' rows (adamerge/vocab.py)
            if shape != tuple(p.shape):
                raise AdamergeError(f"expert {expert!r}: tensor {n!r} has shape {shape}, the base {tuple(p.shape)}")
            if dtype != p.dtype:
                raise AdamergeError(f"expert {expert!r}: tensor {n!r} is {dtype}, the base {p.dtype}")
        extra = next((n for n in params if n not in base), None)
        if extra is not None:
            raise AdamergeError(f"expert {expert!r} has a tensor {extra!r} that the base does not have")

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

    def check_sources(self) -> None:
        """Every local source (or hub id found in the local cache) readable and like the base, from file headers
        alone (nothing is loaded): a missing path, a truncated or inconsistent ``*.safetensors`` or index, a tensor
        of the base's files missing from an expert's of the same architecture or the other way round, one whose
        shape differs from the base's (more rows only where the expert ships the tokenizer that added them) or,
        unless ``pool.dtype`` casts them, whose dtype does; an adapter made for another base (a warning). Keeps
        each expert's layout for reading it."""
        roles = {"base": self.base_source, **{f"expert {n!r}": s for n, s in self.expert_sources.items()}}
        local = {role: directory for role, source in roles.items() if (directory := local_directory(source))}
        headers = {role: self._check_local_source(path, role) for role, path in local.items()}
        base = headers.pop("base", {})
        kind = same_kind(local["base"]) if "base" in local else None
        for role, tensors in headers.items():
            names_match = tensors and base and kind is not None and same_kind(local[role]) == kind
            missing = [n for n in base if names_match and n not in tensors]
            if missing:
                more = f" (nor {len(missing) - 1} more: another architecture?)" if len(missing) > 1 else ""
                raise AdamergeError(f"{role}: its files have no tensor {missing[0]!r} that the base's have{more}")
            extra = next((n for n in tensors if names_match and n not in base), None)
            if extra is not None:
                raise AdamergeError(f"{role} has a tensor {extra!r} that the base does not have")
            for name, entry in tensors.items():
                shape, theirs = entry.shape, base.get(name)
                if theirs is None:
                    continue
                if theirs.shape != shape and not added_rows_allowed(role, local[role], shape, theirs.shape,
                                                                    drop=self.vocabulary.choice == "base"):
                    raise AdamergeError(f"{role}: tensor {name!r} has shape {shape}, the base {theirs.shape}")
                if self.dtype is None and entry.dtype != theirs.dtype:
                    raise AdamergeError(f"{role}: tensor {name!r} is {entry.dtype}, the base {theirs.dtype}")
        self.layouts = {name: headers[f"expert {name!r}"] for name in self.expert_sources
                        if headers.get(f"expert {name!r}")}
        for name, source in self.expert_sources.items():
            if is_adapter(source):
                self._check_adapter_base(Path(source).expanduser(), name)

    def _check_adapter_base(self, path: Path, expert: str) -> None:
        """A LoRA adapter records the model it was trained on; another base is allowed, with a warning."""
        try:
            trained_on = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        except (OSError, ValueError, AttributeError) as e:
            raise AdamergeError(f"expert {expert!r}: {str(path / 'adapter_config.json')!r} is not valid JSON") from e
        base = self.base_source
        if not trained_on or base is None or same_source(trained_on, base):
            return
        log.warning("expert %r: its LoRA adapter was trained on %r, but pool.base is %r; merging it anyway",
                    expert, trained_on, str(base))

    def _check_local_source(self, path: Path, role: str) -> dict[str, TensorEntry]:
        """A local source must be a model directory (or, for an expert, a LoRA adapter) we may read;
        returns what its safetensors headers declare (none for an adapter or pickle weights)."""
        if not path.exists():
            raise AdamergeError(f"{role}: path {str(path)!r} does not exist")
        if (path / "adapter_config.json").exists():
            if role == "base":
                raise AdamergeError(f"base: {str(path)!r} is a LoRA adapter, not a model")
            return {}
        if not (path / "config.json").exists():
            raise AdamergeError(
                f"{role}: {str(path)!r} is not a model directory (no config.json or adapter_config.json)"
            )
        self._check_weight_format(path, role)
        return read_layout(path, role)

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
        """A LoRA expert: peft's model of base + adapter on a private copy of the base, not merged."""
        from peft import PeftModel

        try:
            return PeftModel.from_pretrained(copy.deepcopy(self.base), str(path), is_trainable=False)
        except (OSError, ValueError, RuntimeError) as e:
            raise AdamergeError(f"LoRA adapter {str(path)!r} does not fit the base: {e}") from e


def added_rows_allowed(role: str, source: str | Path, shape: tuple[int, ...], base: tuple[int, ...],
                       drop: bool = False) -> bool:
    """More rows than the base's, all else equal: an expert that added tokens, if it ships its tokenizer or
    the added rows are dropped (``drop``: ``pool.tokenizer=base``); that these are its embedding and output
    tensors is checked once it is loaded."""
    if shape[1:] != base[1:] or shape[0] <= base[0]:
        return False
    if not drop and not has_tokenizer_files(Path(source).expanduser()):
        raise AdamergeError(f"{role}: {shape[0]} rows where the base has {base[0]} (added tokens?): its added "
                            "tokens need its tokenizer files in its directory, or pool.tokenizer=base to drop them")
    return True


def check_finite_expert(expert: str, params: Mapping[str, torch.Tensor], factors: Mapping[str, Factors]) -> None:
    """An expert with NaN/Inf weights would fold into a checkpoint of NaNs: refuse it, naming the first tensor."""
    tensors = {**params, **{f"{n} (LoRA factor {i})": t for n, pair in factors.items() for i, t in enumerate(pair)}}
    bad = next((n for n, t in tensors.items() if t.is_floating_point() and not all_finite(t)), None)
    if bad is not None:
        raise AdamergeError(f"expert {expert!r}: tensor {bad!r} holds NaN/Inf; refusing to merge it")


def read_json_object(path: Path) -> dict:
    """A JSON file holding an object, as a dict ({} where it is missing or unreadable: its user says why)."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def read_config(directory: Path) -> dict:
    """A model directory's ``config.json`` as a dict ({} where it is unreadable: loading it will say why)."""
    return read_json_object(directory / "config.json")


def same_kind(directory: Path) -> tuple:
    """What must agree for two checkpoints to name the same tensors: their architectures and model type."""
    config = read_config(directory)
    return str(config.get("architectures")), str(config.get("model_type"))


def local_directory(source: object) -> Path | None:
    """Where a source's files are on this machine: its path, or a hub id's snapshot already in the local cache
    (never downloaded here); None for modules, builders and hub ids not cached."""
    if not isinstance(source, (str, Path)):
        return None
    return Path(source).expanduser() if is_local(source) else cached_snapshot(str(source))


def same_source(a: str | Path, b: str | Path) -> bool:
    """Two model references name the same model: equal ids, or local paths to the same directory."""
    if str(a) == str(b):
        return True
    return is_local(a) and is_local(b) and Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def is_adapter(source: Source) -> bool:
    """A PEFT adapter directory (what ``_load_lora`` reads)."""
    return (isinstance(source, (str, Path)) and is_local(source)
            and (Path(source).expanduser() / "adapter_config.json").exists())


def unload_lora(peft_model: nn.Module, expert: str) -> tuple[nn.Module, dict[int, Factors]]:
    """The model without its LoRA layers (``modules_to_save`` kept) and, by ``id`` of each targeted
    module, its factors ``(left, right)``, ``left @ right`` being the adapter's delta to that
    module's weight (arXiv 2106.09685).

    Adapters that factors cannot express exactly (DoRA and other variants, ``lora_bias``, layers
    other than Linear/Embedding) are merged by peft instead: dense task vectors, logged.
    """
    from peft.tuners.lora import Embedding, Linear, LoraLayer

    layers = [m for m in peft_model.modules() if isinstance(m, LoraLayer)]
    odd = next((m for m in layers if type(m) not in (Linear, Embedding)
                or any(m.lora_variant.get(a) or m.lora_bias.get(a) for a in m.active_adapters)), None)
    if odd is not None:
        log.info("expert %r: its LoRA layers (%s) cannot stay factors (DoRA, lora_bias or a layer other than "
                 "Linear/Embedding); merged by peft into dense task vectors", expert, type(odd).__name__)
        return peft_model.merge_and_unload(), {}
    factors = {id(m.get_base_layer()): layer_factors(m) for m in layers}
    return peft_model.unload(), factors


def layer_factors(layer: nn.Module) -> Factors:
    """``(left, right)`` of one LoRA layer: its active adapters' ranks side by side, scaling in ``left``.

    peft's delta is ``B @ A * scaling``, transposed for Embedding and ``fan_in_fan_out`` (GPT-2's
    Conv1D): then ``(A^T scaling) @ B^T``.
    """
    lefts, rights = [], []
    for adapter in layer.active_adapters:
        if adapter in getattr(layer, "lora_embedding_A", {}):
            b, a, transposed = layer.lora_embedding_B[adapter], layer.lora_embedding_A[adapter], True
        else:
            b, a, transposed = layer.lora_B[adapter].weight, layer.lora_A[adapter].weight, layer.fan_in_fan_out
        left, right = (a.T, b.T) if transposed else (b, a)
        lefts.append(left.detach() * layer.scaling[adapter])
        rights.append(right.detach())
    return torch.cat(lefts, 1), torch.cat(rights, 0)


def stack_factors(parts: Sequence[tuple[int, torch.Tensor, torch.Tensor]], num_experts: int):
    """One tensor's ``LoraFactors`` from (expert index, left, right) of each LoRA expert changing it."""
    owner = torch.cat([torch.full((left.shape[1],), k, dtype=torch.long, device=left.device) for k, left, _ in parts])
    return LoraFactors(torch.cat([p[1] for p in parts], 1), torch.cat([p[2] for p in parts], 0), owner, num_experts)
