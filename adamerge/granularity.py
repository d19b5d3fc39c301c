"""Granularities: how many merge coefficients each (expert, tensor) pair gets and how they broadcast.

Every granularity owns raw trainable parameters of shape ``(K, n)`` per coefficient group, turns
them into coefficients with a transform (identity, clamp, sigmoid, tanh, softmax over experts) and
expands a group to a tensor that broadcasts against the ``(K, *shape)`` task-vector stack.

- ``Task``   one coefficient per expert, shared by all tensors (AdaMerging task-wise, arXiv 2310.02575).
- ``Layer``  one per expert per tensor (AdaMerging layer-wise).
- ``Block``  one per tensor, optionally P partitions of it: random per element, as aTLAS's code,
  or contiguous rows (aTLAS, arXiv 2407.02880).
- ``Chunk``  n_p contiguous chunks of each flattened tensor (or of its rows), set by glob or by an
  allocation (Expert Merging / Expert Merging++, arXiv 2509.25712).
- ``Column`` one per input feature / hidden dim, one scalar per bias (DAM, arXiv 2410.08371).
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from adamerge.errors import AdamergeError
from adamerge.masks import build_mask
from adamerge.tensors import TensorInfo

Transform = tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]

# name -> (raw -> coefficient, coefficient -> raw); softmax normalizes over experts (dim 0).
TRANSFORMS: dict[str, Transform] = {
    "identity": (lambda x: x, lambda c: c),
    "clamp": (lambda x: x.clamp(0.0, 1.0), lambda c: c),
    "sigmoid": (torch.sigmoid, torch.logit),
    "tanh": (torch.tanh, torch.atanh),
    "softmax": (lambda x: torch.softmax(x, dim=0), torch.log),
}
# open/closed interval of init values each transform can represent
# (tanh is open at both ends but reaches 0: negative inits are refused before this range is checked)
INIT_RANGE = {"clamp": (0.0, 1.0, True), "sigmoid": (0.0, 1.0, False), "tanh": (-1.0, 1.0, False)}
SPACES = ("task_vectors", "weights")


class Granularity(nn.Module):
    """Base class. Subclasses define ``count`` (coefficients per expert for a tensor) and ``expand``.

    Args:
        init: initial coefficient: one float for all experts, a mapping expert -> float,
            ``"uniform"`` (1/K each, the experts' simple average), or ``"sens"``: Sens-Merging's layer-wise
            values (arXiv 2502.12420), computed from calibration data before training
            (``sensitivity.apply_sens_init``; until then ``sens_scale`` each).
        lines_beta: LiNeS (arXiv 2410.17146): the coefficients of block ``l`` of ``L`` (the first
            ``.N.`` in a tensor's name) start at ``init + lines_beta * l / (L - 1)``, tensors outside
            the blocks at ``init`` (github.com/wang-kee/LiNeS, src/eval/eval.py ``LiNeS_scaling``,
            with ``alpha`` = ``init``). Needs a coefficient per tensor (not ``granularity=task``).
        sens_scale, sens_temperature: Sens-Merging's ``lambda`` and softmax temperature (``init=sens``).
        transform: applied to the raw parameters before use (see ``TRANSFORMS``).
        space: ``task_vectors`` merges ``W0 + sum_k c_k tau_k``; ``weights`` merges
            ``sum_k c_k W_k`` (DAM's form), computed from the same stack.
        mask: a Concrete mask over the task vectors (arXiv 2312.06173, ``adamerge.masks``): null, ``shared``,
            ``per_task``, or a mapping of ``ConcreteMask``'s options; ``broadcast`` then gives elementwise
            coefficients ``c_k * m``.
    """

    state_prefix = "granularity."  # keys of ``state_tensors`` in the saved coefficients file

    def __init__(
        self, init: float | str | Mapping[str, float] = 0.3, transform: str = "identity", space: str = "task_vectors",
        lines_beta: float | None = None, sens_scale: float = 1.0, sens_temperature: float = 1.0,
        mask: Mapping | str | None = None,
    ) -> None:
        super().__init__()
        if transform not in TRANSFORMS:
            raise AdamergeError(f"granularity.transform={transform!r}; choose from {sorted(TRANSFORMS)}")
        if space not in SPACES:
            raise AdamergeError(f"granularity.space={space!r}; choose from {list(SPACES)}")
        if lines_beta is not None and (isinstance(lines_beta, bool) or not isinstance(lines_beta, int | float)
                                       or not math.isfinite(lines_beta)):
            raise AdamergeError(f"granularity.lines_beta={lines_beta!r} must be a number or null")
        if not sens_temperature > 0:
            raise AdamergeError(f"granularity.sens_temperature={sens_temperature!r} must be > 0")
        self.init, self.transform, self.space, self.lines_beta = init, transform, space, lines_beta
        self.sens_scale, self.sens_temperature = float(sens_scale), float(sens_temperature)
        self.raw = nn.ParameterDict()
        self.keys: dict[str, str] = {}  # tensor name -> key of its group in ``raw``
        self.infos: dict[str, TensorInfo] = {}
        self.mask = build_mask(mask, space)  # None without a mask

    # ---- what subclasses define ---------------------------------------------------------------

    def count(self, info: TensorInfo) -> int:
        """Number of coefficients per expert for this tensor."""
        raise NotImplementedError

    def expand(self, coef: torch.Tensor, info: TensorInfo) -> torch.Tensor:
        """``(K, n)`` coefficients -> a tensor broadcastable against ``(K, *info.shape)``."""
        raise NotImplementedError

    def group(self, info: TensorInfo) -> str:
        """Tensors with the same group share coefficients (all of them, for ``Task``)."""
        return info.name

    # ---- shared machinery -----------------------------------------------------------------------

    def setup(self, experts: Sequence[str], infos: Sequence[TensorInfo]) -> None:
        """Create the raw parameters for these experts and tensors, at ``init`` (plus LiNeS' depth term)."""
        init = self.init_values(experts).tolist()
        depths = block_depths([i.name for i in infos]) if self.lines_beta is not None else {}
        group_depth: dict[str, float] = {}
        for info in infos:
            self.infos[info.name] = info
            key = self.group(info).replace(".", "/")
            self.keys[info.name] = key
            if depths and group_depth.setdefault(key, depths[info.name]) != depths[info.name]:
                raise AdamergeError("granularity.lines_beta scales each layer: it needs a coefficient per tensor "
                                    "(granularity=layer, block, chunk or column)")
            if key in self.raw:
                continue
            start = self.checked([v + float(self.lines_beta) * depths[info.name] if depths else v for v in init])
            self.raw[key] = nn.Parameter(TRANSFORMS[self.transform][1](start)[:, None].repeat(1, self.count(info)))
        if self.mask is not None:
            self.mask.setup(experts, infos)

    def init_values(self, experts: Sequence[str]) -> torch.Tensor:
        """The ``(K,)`` initial coefficients, validated against the transform's range."""
        if self.init == "uniform":  # 1/K each: the simple average of the experts
            values = [1.0 / len(experts)] * len(experts)
        elif self.init == "sens":  # what Sens-Merging gives where every expert is equally sensitive
            values = [self.sens_scale] * len(experts)
        elif isinstance(self.init, Mapping):
            missing = [e for e in experts if e not in self.init]
            if missing:
                raise AdamergeError(f"granularity.init has no value for expert(s) {missing}")
            values = [float(self.init[e]) for e in experts]
        else:
            values = [float(self.init)] * len(experts)
        return self.checked(values)

    def checked(self, values: Sequence[float]) -> torch.Tensor:
        """``values`` as a tensor if every initial coefficient is one the transform can produce."""
        for v in values:
            if math.isnan(v) or v < 0:
                raise AdamergeError(f"granularity.init={v} must be a non-negative number")
            lo, hi, closed = INIT_RANGE.get(self.transform, (0.0, math.inf, True))
            inside = lo <= v <= hi if closed else lo < v < hi
            if not inside or (self.transform == "softmax" and v == 0):
                raise AdamergeError(f"granularity.init={v} is outside what transform={self.transform!r} can produce")
        return torch.tensor(values, dtype=torch.float32)

    def coefficients(self, name: str) -> torch.Tensor:
        """Transformed ``(K, n)`` coefficients of the group that tensor ``name`` belongs to."""
        return TRANSFORMS[self.transform][0](self.raw[self.keys[name]])

    def broadcast(self, name: str) -> torch.Tensor:
        """Coefficients for tensor ``name``, broadcastable against its ``(K, *shape)`` stack (times the mask)."""
        coef = self.expand(self.coefficients(name), self.infos[name])
        return coef if self.mask is None else self.mask.apply(name, coef)

    def groups(self) -> dict[str, torch.Tensor]:
        """Transformed ``(K, n)`` coefficients of every group, with grad (for regularizers)."""
        fwd = TRANSFORMS[self.transform][0]
        return {key.replace("/", "."): fwd(p) for key, p in self.raw.items()}

    def table(self) -> dict[str, torch.Tensor]:
        """Transformed coefficients per group (detached, fp32): what is saved and plotted."""
        return {name: c.detach().float() for name, c in self.groups().items()}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors besides the coefficients that define the merge (keys start with ``state_prefix``);
        saved beside the coefficients so that ``adamerge fold`` rebuilds the same merge."""
        return {} if self.mask is None else self.mask.state_tensors(self.state_prefix)

    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Restore ``state_tensors()`` from a saved file (which may hold other keys too)."""
        if self.mask is not None:
            self.mask.load_state_tensors(tensors, self.state_prefix)

    @torch.no_grad()
    def load_table(self, table: Mapping[str, torch.Tensor]) -> None:
        """Set the raw parameters so that ``table()`` returns these coefficients (groups may be a subset)."""
        inverse = TRANSFORMS[self.transform][1]
        for name, values in table.items():
            key = name.replace(".", "/")
            if key not in self.raw:
                raise AdamergeError(f"coefficients for unknown group {name!r}")
            target = self.raw[key]
            target.copy_(inverse(values.to(target).expand_as(target)))


BLOCK_INDEX = re.compile(r"\.(\d+)\.")


def block_depths(names: Sequence[str]) -> dict[str, float]:
    """LiNeS' depth of each tensor: block index ``l`` (the first ``.N.`` in its name) over ``L - 1``, 0 for
    tensors outside the blocks (embeddings, final norm, head)."""
    index = {n: int(m.group(1)) if (m := BLOCK_INDEX.search(n)) else None for n in names}
    last = max((i for i in index.values() if i is not None), default=0)
    return {n: (i / last if i is not None and last > 0 else 0.0) for n, i in index.items()}


def _singleton_view(coef: torch.Tensor, ndim: int, axis: int | None) -> torch.Tensor:
    """View ``(K, n)`` as ``(K, 1, .., n at axis, .., 1)`` over a tensor with ``ndim`` dims."""
    shape = [coef.shape[0]] + [1] * ndim
    if axis is not None:
        shape[axis + 1] = coef.shape[1]
    return coef.reshape(shape)


class Task(Granularity):
    """One coefficient per expert for the whole model (AdaMerging task-wise, arXiv 2310.02575)."""

    def group(self, info: TensorInfo) -> str:
        return "task"

    def count(self, info: TensorInfo) -> int:
        return 1

    def expand(self, coef: torch.Tensor, info: TensorInfo) -> torch.Tensor:
        return _singleton_view(coef, len(info.shape), None)


class RowChunks(Granularity):
    """Coefficients over contiguous row blocks of each tensor (dim 0, as ``torch.tensor_split`` splits)."""

    def expand(self, coef: torch.Tensor, info: TensorInfo) -> torch.Tensor:
        n, ndim = coef.shape[1], len(info.shape)
        if n == 1:
            return _singleton_view(coef, ndim, None)
        rows = info.shape[0]
        sizes = torch.tensor([rows // n + (i < rows % n) for i in range(n)], device=coef.device)
        per_row = coef.repeat_interleave(sizes, dim=1, output_size=rows)
        return _singleton_view(per_row, ndim, 0)


class Layer(RowChunks):
    """One coefficient per expert per parameter tensor (AdaMerging layer-wise, arXiv 2310.02575)."""

    def count(self, info: TensorInfo) -> int:
        return 1


PARTITIONS = ("random", "rows")
CHUNKINGS = ("flat", "rows")


def owner_of_elements(mask: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """``(K, n)`` coefficients -> ``(K, *mask.shape)``: each element takes its partition's coefficient."""
    index = mask.flatten().int() if mask.dtype == torch.uint8 else mask.flatten()
    return coef.index_select(1, index).reshape(coef.shape[0], *mask.shape)


class Block(RowChunks):
    """aTLAS (arXiv 2407.02880): one coefficient per expert per tensor ("parameter block"), or P per
    tensor with ``partitions=P`` (aTLAS x K).

    ``partition=random`` follows the released code (fredzzhang/atlas, ``src/composition.py``,
    ``WeightedImageEncoder``): every element of a tensor goes to one of P partitions drawn by
    ``torch.randint(P, shape)``, one mask per tensor shape (tensors of equal shape share it, as
    there). The masks come from a generator seeded with ``seed`` and are stored with the
    coefficients (``state_tensors``), so a refold uses the very same assignment. (That code's
    ``mask_multiply`` returns zero for every tensor that is not a matrix; here vectors are
    partitioned the same way instead of dropped.) ``partition=rows``: P contiguous row blocks;
    tensors with fewer rows than P get one partition per row.
    """

    def __init__(self, partitions: int = 1, partition: str = "random", seed: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        if partitions < 1:
            raise AdamergeError(f"granularity.partitions={partitions} must be >= 1")
        if partition not in PARTITIONS:
            raise AdamergeError(f"granularity.partition={partition!r}; choose from {list(PARTITIONS)}")
        self.partitions, self.partition, self.seed = partitions, partition, seed
        self.masks = nn.Module()  # shape key -> (*shape) partition index per element (buffers move with .to)

    @property
    def random(self) -> bool:
        return self.partition == "random" and self.partitions > 1

    def count(self, info: TensorInfo) -> int:
        if self.random:
            return self.partitions
        return min(self.partitions, max(info.shape[0], 1) if info.shape else 1)

    def setup(self, experts: Sequence[str], infos: Sequence[TensorInfo]) -> None:
        super().setup(experts, infos)
        if not self.random:
            return
        generator = torch.Generator().manual_seed(self.seed)
        dtype = torch.uint8 if self.partitions <= 256 else torch.int32
        for info in infos:
            key = shape_key(info.shape)
            if not hasattr(self.masks, key):
                mask = torch.randint(self.partitions, tuple(info.shape), generator=generator).to(dtype)
                self.masks.register_buffer(key, mask, persistent=False)

    def expand(self, coef: torch.Tensor, info: TensorInfo) -> torch.Tensor:
        if not self.random:
            return super().expand(coef, info)
        return owner_of_elements(getattr(self.masks, shape_key(info.shape)), coef)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        partitions = {f"{self.state_prefix}partition.{key}": mask for key, mask in self.masks.named_buffers()}
        return {**super().state_tensors(), **partitions}

    @torch.no_grad()
    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        super().load_state_tensors(tensors)
        for key, mask in self.masks.named_buffers():
            saved = tensors.get(f"{self.state_prefix}partition.{key}")
            if saved is None or saved.shape != mask.shape:
                raise AdamergeError(f"the saved coefficients hold no partition mask of shape {key}")
            mask.copy_(saved)


def shape_key(shape: Sequence[int]) -> str:
    """A buffer name for a tensor shape: ``(64, 32)`` -> ``"64x32"``, a scalar -> ``"scalar"``."""
    return "x".join(map(str, shape)) or "scalar"


def chunk_limit(info: TensorInfo, chunking: str) -> int:
    """Most chunks a tensor can have: one per element (``flat``) or one per row (``rows``)."""
    if chunking == "flat":
        return math.prod(info.shape)
    return info.shape[0] if info.shape else 1


class Chunk(RowChunks):
    """Expert Merging (arXiv 2509.25712): n_p chunks per tensor, each with its own coefficient.

    ``chunking=flat`` follows the released code (github.com/Littleor/ExpertMerging,
    ``global_utils/merging_utils.py``, ``scale_tensor_by_coeffs``): ``torch.chunk`` of the flattened
    tensor, i.e. chunks of ``ceil(N / n_p)`` elements, the last one shorter. ``torch.chunk`` may make
    fewer than n_p chunks (6 elements in 4 chunks: 2, 2, 2), where that code leaves the extra
    coefficients unused; here the count is what ``torch.chunk`` makes, so that no coefficient is
    idle. ``chunking=rows``: n_p contiguous row blocks (``torch.tensor_split`` along dim 0).

    Args:
        chunks: glob over tensor names -> number of chunks (first match wins; default 1).
        counts: exact per-tensor counts (Expert Merging++'s allocation); they take precedence.
        chunking: ``flat`` or ``rows``.
    """

    def __init__(self, chunks: Mapping[str, int] | None = None, counts: Mapping[str, int] | None = None,
                 chunking: str = "flat", **kwargs):
        super().__init__(**kwargs)
        if chunking not in CHUNKINGS:
            raise AdamergeError(f"granularity.chunking={chunking!r}; choose from {list(CHUNKINGS)}")
        self.chunks = dict(chunks or {})
        self.counts = dict(counts or {})
        self.chunking = chunking

    def count(self, info: TensorInfo) -> int:
        n = self.counts.get(info.name)
        if n is None:
            n = next((v for pattern, v in self.chunks.items() if fnmatch.fnmatchcase(info.name, pattern)), 1)
        limit = chunk_limit(info, self.chunking)
        if not 1 <= n <= limit:
            unit = "elements" if self.chunking == "flat" else "rows"
            raise AdamergeError(f"granularity.chunks: {n} chunks for {info.name!r}, which has {limit} {unit}")
        return math.ceil(limit / math.ceil(limit / n)) if self.chunking == "flat" else n

    def expand(self, coef: torch.Tensor, info: TensorInfo) -> torch.Tensor:
        n = coef.shape[1]
        if self.chunking == "rows" or n == 1:
            return super().expand(coef, info)
        numel = math.prod(info.shape)
        size = math.ceil(numel / n)
        sizes = torch.tensor([size] * (n - 1) + [numel - size * (n - 1)], device=coef.device)
        return coef.repeat_interleave(sizes, dim=1, output_size=numel).reshape(coef.shape[0], *info.shape)


class Column(Granularity):
    """DAM (arXiv 2410.08371): one coefficient per input feature of a matrix (per hidden dim of an
    embedding or norm), one scalar per bias. The feature axis comes from ``TensorInfo.feature_dim``,
    which knows GPT-2's ``Conv1D`` stores (in, out)."""

    def count(self, info: TensorInfo) -> int:
        return 1 if info.feature_dim is None else info.shape[info.feature_dim]

    def expand(self, coef: torch.Tensor, info: TensorInfo) -> torch.Tensor:
        return _singleton_view(coef, len(info.shape), info.feature_dim)


GRANULARITIES: dict[str, type[Granularity]] = {
    "task": Task,
    "layer": Layer,
    "block": Block,
    "chunk": Chunk,
    "column": Column,
}
