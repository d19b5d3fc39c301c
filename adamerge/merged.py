"""MergedModel: the base architecture run with merged weights computed from trainable coefficients.

Like peft's tuners it wraps a frozen model and can always hand back a plain one (``fold``). Each
merged tensor is built once per forward as one fused reduction over the K experts (a GEMV when
the granularity gives one scalar per expert; one matmul over the concatenated ranks for LoRA
factors), so autograd reads each task vector once more in backward to produce the coefficient
gradient, and nothing else. Offloaded stacks (``pool.offload=cpu``) go through ``StreamedDelta``,
which streams a stack in again for backward instead of keeping its device copy.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from adamerge.errors import AdamergeError
from adamerge.granularity import Granularity
from adamerge.offload import HostStacks, Streamed
from adamerge.sharding import Sharded, regather_in_backward, shard_stack
from adamerge.taskvectors import LoraFactors, TaskVectors

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

# a dense (K, *shape) stack, LoRA factors, an offloaded stack, this rank's rows of a sharded stack
Source = torch.Tensor | LoraFactors | Streamed | Sharded


def fits_factors(coef_shape: torch.Size) -> bool:
    """Coefficients constant along rows or along columns scale one LoRA factor; others need dense values."""
    return coef_shape[1] == 1 or coef_shape[2] == 1


def factor_operands(factors: LoraFactors, coef: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a, b)`` with ``a @ b = sum_k c_k B_k A_k``: row coefficients scale the columns of ``B_k``
    (task, layer, row chunks), column coefficients the columns of ``A_k`` (DAM's per input
    feature). Accumulates in the coefficients' (fp32) precision; the factors are small."""
    per_slot = coef[factors.owner]  # (R, rows or 1, cols or 1)
    dtype = torch.promote_types(factors.left.dtype, coef.dtype)
    left, right = factors.left.to(dtype), factors.right.to(dtype)
    if per_slot.shape[2] == 1:
        return left * per_slot[:, :, 0].T, right
    return left, right * per_slot[:, 0, :]


def matmul_operands(source: torch.Tensor | LoraFactors, coef: torch.Tensor):
    """``(a, b)`` whose product is ``sum_k c_k tau_k`` viewed 2-D, or None where it is elementwise."""
    if isinstance(source, LoraFactors):
        return factor_operands(source, coef)
    k = source.shape[0]
    if coef.numel() == k:  # one scalar per expert: a GEMV that never builds a (K, *shape) temporary
        return coef.reshape(1, k).to(source.dtype), source.reshape(k, -1)
    return None


def task_delta(source: Source, coef: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``sum_k c_k * tau_k`` of shape ``shape``, differentiable in ``coef``."""
    if isinstance(source, Streamed):
        return StreamedDelta.apply(coef, source, shape)
    operands = matmul_operands(source, coef)
    if operands is None:  # type promotion: fp32 coefficients accumulate reduced-precision stacks in fp32
        return (coef * source).sum(0)
    return (operands[0] @ operands[1]).reshape(shape)


def coefficient_grad(stack: torch.Tensor, grad: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """``<grad, tau_k>`` reduced to ``coef``'s broadcast shape: what autograd gives ``task_delta``."""
    k = stack.shape[0]
    if coef.numel() == k:
        return (grad.reshape(1, -1).to(stack.dtype) @ stack.reshape(k, -1).T).to(coef.dtype).reshape(coef.shape)
    return (grad * stack).sum_to_size(coef.shape)


class StreamedDelta(torch.autograd.Function):
    """``sum_k c_k tau_k`` of an offloaded stack. Forward merges with a transient device copy;
    backward streams the stack in again for ``<grad, tau_k>``, so autograd saves only the
    coefficients and device memory does not grow with K (the recompute trade of activation
    checkpointing, arXiv 1604.06174, applied to the task vectors)."""

    @staticmethod
    def forward(ctx, coef: torch.Tensor, source: Streamed, shape: torch.Size) -> torch.Tensor:
        ctx.source = source
        ctx.save_for_backward(coef)
        return task_delta(source.fetch(step=1), coef, shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (coef,) = ctx.saved_tensors
        return coefficient_grad(ctx.source.fetch(step=-1), grad, coef), None, None


def merge_tensor(w0: torch.Tensor, stack: Source, coef: torch.Tensor, space: str = "task_vectors"):
    """``W0 + sum_k c_k * tau_k`` (task-vector space) or ``sum_k c_k * (W0 + tau_k)`` (weight space).

    ``stack`` is ``(K, *w0.shape)`` (or LoRA factors, or an offloaded stack); ``coef`` broadcasts
    against it. A sharded stack is merged on this rank's rows, then gathered (``sharding.py``).
    """
    if isinstance(stack, Sharded):
        return stack.gather(merge_tensor(stack.rows(w0), stack.local, stack.rows(coef, 1), space))
    delta = task_delta(stack, coef, w0.shape)
    if space == "weights":
        return w0 * coef.sum(0).to(w0.dtype) + delta.to(w0.dtype)
    return w0 + delta.to(w0.dtype)


def fold_tensor_(p: torch.Tensor, source: torch.Tensor | LoraFactors, coef: torch.Tensor, space: str) -> None:
    """``merge_tensor`` written into ``p`` (which holds W0) in place. Where the delta is one matmul
    in ``p``'s dtype, ``addmm_`` adds it without a full-size temporary (BENCHMARKS.md: fold of a
    127M model 0.96 -> 0.37 s, peak +1116 -> +509 MB)."""
    if space == "weights":
        p.mul_(coef.sum(0).to(p.dtype))
    operands = matmul_operands(source, coef)
    if operands is not None and operands[0].dtype == operands[1].dtype == p.dtype:
        p.view(operands[0].shape[0], -1).addmm_(*operands)
    else:
        p.add_(task_delta(source, coef, p.shape).to(p.dtype))


def no_init_weights():
    """transformers' switch that skips the random init of a model whose every weight is loaded next."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers < 5
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


def _key(name: str) -> str:
    return name.replace(".", "/")


class MergedModel(nn.Module):
    """Frozen base + stacked task vectors + a granularity's coefficients; ``forward`` is the base's.

    Args:
        base: the base model; its parameters are W0 and stay frozen.
        task_vectors: the stacks (or LoRA factors), one per merged tensor (names as in
            ``base.named_parameters()``); offloaded stacks stay in host memory, not in buffers.
        granularity: owns the coefficients; ``setup`` is called here for these experts and tensors.
        recompute: keep neither merged weights nor activations for backward; rebuild both there
            (activation checkpointing of the whole forward), for when the merged copy does not fit.
        shard: under data parallelism, keep only this rank's rows of each dense stack while training
            (``shard`` is called from ``Trainer.fit``, ``unshard`` at its end; ``sharding.py``).
    """

    def __init__(self, base: nn.Module, task_vectors: TaskVectors, granularity: Granularity,
                 recompute: bool = False, shard: bool = False) -> None:
        super().__init__()
        self.recompute, self.shard_stacks = recompute, shard
        self.base = base.requires_grad_(False)
        self.experts = list(task_vectors.experts)
        self.names = task_vectors.names
        self.merged_set = set(self.names)
        self.granularity = granularity
        granularity.setup(self.experts, [task_vectors.infos[n] for n in self.names])
        unfit = [n for n in task_vectors.factors if not fits_factors(granularity.broadcast(n).shape)]
        if unfit:
            why = ("a Concrete mask (granularity.mask) varies element by element" if granularity.mask is not None
                   else f"{type(granularity).__name__}'s coefficients vary along both axes of a matrix")
            task_vectors = task_vectors.densified(why, unfit)
        self.host = HostStacks(dict(task_vectors.stacks)) if task_vectors.offloaded else None
        self.task_vectors = nn.Module()  # a namespace so that .to(device) moves the stacks (unless offloaded)
        if self.host is None:
            for name, stack in task_vectors.stacks.items():
                self.task_vectors.register_buffer(_key(name), stack, persistent=False)
        self.lora = nn.ModuleDict()  # tensor -> its LoRA factors (buffers left, right, owner)
        for name, factors in task_vectors.factors.items():
            self.lora[_key(name)] = nn.Module()
            for field in ("left", "right", "owner"):
                self.lora[_key(name)].register_buffer(field, getattr(factors, field), persistent=False)
        self.heads = nn.ModuleDict()  # expert -> its task head (frozen buffers), for classifiers
        for expert, head in task_vectors.heads.items():
            self.heads[_key(expert)] = nn.Module()
            for name, value in head.items():
                self.heads[_key(expert)].register_buffer(_key(name), value, persistent=False)
        self.head_configs = dict(task_vectors.head_configs)
        self.added = task_vectors.added  # rows of tokens the experts added: constants written by fold (vocab.py)
        self._expert: int | None = None  # teacher mode: exactly this expert
        self._task: int | None = None  # whose head answers (classifiers)
        self._shared: dict[str, torch.Tensor] | None = None  # one step's merge, reused by every task (merge_once)
        self._teacher: dict[str, torch.Tensor] | None = None  # a sharded expert's weights, gathered once (as_expert)
        self.sharded: dict[str, Sharded] = {}  # this rank's rows of each dense stack, between shard and unshard

    def source(self, name: str) -> Source:
        """Tensor ``name``'s task vectors as the merge reads them: stack, LoRA factors or offloaded stack."""
        if _key(name) in self.lora:
            m = self.lora[_key(name)]
            return LoraFactors(m.left, m.right, m.owner, len(self.experts))
        if name in self.sharded:
            return self.sharded[name]
        if self.host is not None:
            return Streamed(self.host, name, self.base.get_parameter(name).device)
        return getattr(self.task_vectors, _key(name))

    def stack(self, name: str) -> torch.Tensor:
        """The dense ``(K, *shape)`` stack (LoRA factors are densified for the caller; a sharded stack is
        gathered into host memory, a collective call)."""
        source = self.source(name)
        if isinstance(source, LoraFactors):
            return source.dense()
        if isinstance(source, Sharded):
            return source.fetch("cpu")
        return self.host.stacks[name] if isinstance(source, Streamed) else source

    def shard(self, mesh: DeviceMesh, device: torch.device) -> None:
        """Keep only this rank's rows of each dense stack, on ``device``; the whole stacks are dropped."""
        for name in [n for n in self.names if _key(n) in self.task_vectors._buffers]:
            self.sharded[name] = shard_stack(getattr(self.task_vectors, _key(name)), mesh, device)
            delattr(self.task_vectors, _key(name))

    def unshard(self) -> None:
        """Gather the sharded stacks into host memory (a collective call): what follows training (fold,
        evaluation, writing) then reads them as offloaded stacks (``pool.offload=cpu``)."""
        if self.sharded:
            self.host = HostStacks({n: s.fetch("cpu") for n, s in self.sharded.items()})
            self.sharded = {}

    def replace_stack(self, name: str, stack: torch.Tensor) -> None:
        """Swap in adjusted task vectors (DOGE); the old tensor is not modified, it may be shared."""
        if _key(name) in self.lora:
            del self.lora[_key(name)]
        if self.host is not None:
            stacks = {**self.host.stacks, name: stack.cpu()}
            self.host = HostStacks({n: stacks[n] for n in self.names if n in stacks})
        else:
            self.task_vectors.register_buffer(_key(name), stack, persistent=False)

    def expert_delta(self, name: str, k: int) -> torch.Tensor:
        """tau_k of one tensor, alone (teacher mode)."""
        source = self.source(name)
        if isinstance(source, LoraFactors):
            return source.expert(k)
        if isinstance(source, Sharded):
            return source.row(k)
        return self.host.row(name, k, source.device) if isinstance(source, Streamed) else source[k]

    def merged_weights(self) -> dict[str, torch.Tensor]:
        """Merged value of every merged tensor (exactly expert k's in teacher mode), plus the task's head."""
        if self._expert is not None:
            weights = self._teacher if self._teacher is not None else self.expert_weights(self._expert)
        else:
            weights = self.merge()
        return {**weights, **self.head_weights()}

    def expert_weights(self, k: int) -> dict[str, torch.Tensor]:
        """``W0 + tau_k`` of every merged tensor: expert k's weights."""
        w0 = dict(self.base.named_parameters())
        return {n: w0[n] + self.expert_delta(n, k).to(w0[n].dtype) for n in self.names}

    def merge(self) -> dict[str, torch.Tensor]:
        """``W0 + sum_k c_k tau_k`` of every merged tensor (inside ``merge_once``: the step's one merge)."""
        if self._shared is not None:
            return self._shared
        return {n: self.merged_tensor(n) for n in self.names}

    def merged_tensor(self, name: str) -> torch.Tensor:
        """``W0 + sum_k c_k tau_k`` of one tensor."""
        g = self.granularity
        return merge_tensor(self.base.get_parameter(name), self.source(name), g.broadcast(name), g.space)

    @contextmanager
    def merge_once(self) -> Iterator[MergedModel]:
        """Within the block every forward reuses one merge: a training step over T tasks' batches
        then reduces each tensor's task vectors once, not T times, and backward reads them once.
        Not with ``recompute``, whose point is to keep no merged weights between forward and backward."""
        if self.recompute or self._shared is not None:
            yield self
            return
        self._shared = self.merge()
        try:
            yield self
        finally:
            self._shared = None

    def head_weights(self) -> dict[str, torch.Tensor]:
        """The current task's head (teacher mode: the expert's own); none without heads or task."""
        task = self._expert if self._expert is not None else self._task
        if not len(self.heads) or task is None:
            return {}
        head = self.heads[self.experts[task].replace(".", "/")]
        return {name.replace("/", "."): value for name, value in head.named_buffers()}

    def forward(self, *args, **kwargs):
        if self.recompute and torch.is_grad_enabled():
            return checkpoint(self._forward, *args, use_reentrant=False, **kwargs)
        return self._forward(*args, **kwargs)

    def _forward(self, *args, **kwargs):
        weights = self.merged_weights()
        with self.regathered_in_backward(weights):
            return functional_call(self.base, weights, args, kwargs, tie_weights=True, strict=False)

    def regathered_in_backward(self, weights: dict[str, torch.Tensor]):
        """Training on sharded stacks: autograd keeps no gathered weight for backward, which gathers it again
        (``sharding.regather_in_backward``); not in teacher mode (no gradient) nor with ``recompute``
        (activation checkpointing already recomputes the forward)."""
        if not self.sharded or self._expert is not None or self.recompute or not torch.is_grad_enabled():
            return nullcontext()
        return regather_in_backward({n: weights[n] for n, s in self.sharded.items() if s.split}, self.merged_tensor)

    def index(self, expert: int | str) -> int:
        k = self.experts.index(expert) if expert in self.experts else expert
        if not isinstance(k, int) or not 0 <= k < len(self.experts):
            raise AdamergeError(f"no expert {expert!r}; the pool has {self.experts}")
        return k

    @contextmanager
    def as_expert(self, expert: int | str) -> Iterator[MergedModel]:
        """Teacher mode: run as expert k exactly (W0 + tau_k, with its head), without loading it again.
        Sharded stacks are gathered once here, so forwards inside make no collective call (a greedy
        continuation may stop after a different number of forwards on each rank)."""
        previous, self._expert = self._expert, self.index(expert)
        kept = self._teacher
        self._teacher = self.expert_weights(self._expert) if self.sharded else None
        try:
            yield self
        finally:
            self._expert, self._teacher = previous, kept

    @contextmanager
    def task(self, task: int | str) -> Iterator[MergedModel]:
        """Answer with task k's head (merged backbone + head k); a no-op for models without heads."""
        previous = self._task
        if len(self.heads):
            self._task = self.index(task)
        try:
            yield self
        finally:
            self._task = previous

    @torch.no_grad()
    def fold(self, task: int | str | None = None) -> nn.Module:
        """A plain model of the base class holding the merged weights (tied weights stay tied).

        With per-task heads and ``task`` given, the model has that expert's config (label names)
        and head; without ``task`` it keeps the base's head (use ``.base_model`` for the backbone).
        Each merged tensor is written into the copy in place, one at a time (``fold_tensor_``). Where experts
        added tokens, the model then grows to the merged vocabulary (``AddedRows.extend``).
        """
        if task is not None and len(self.heads):
            with self.task(task), no_init_weights():  # every weight is loaded next: skip the random init
                folded = type(self.base)(self.head_configs[self.experts[self.index(task)]]).to(self.base.dtype)
                folded.load_state_dict({**self.base.state_dict(), **self.head_weights()}, strict=True)
                return self._fold_into(folded).eval()
        return self._fold_into(copy.deepcopy(self.base))

    def _fold_into(self, folded: nn.Module) -> nn.Module:
        """``folded`` holds W0 (and its head); add the merge (or expert k's task vectors) to it."""
        params = dict(folded.named_parameters())
        for name in self.names:
            self._fold_tensor(name, params[name])
        for name, value in self.head_weights().items():
            params[name].copy_(value)
        return folded if self.added is None else self.added.extend(folded)

    def _fold_tensor(self, name: str, p: torch.Tensor) -> None:
        """Add merged tensor ``name``'s delta (or expert k's task vector) to ``p``, which holds W0."""
        if self._expert is not None:
            p.add_(self.expert_delta(name, self._expert).to(p.device, p.dtype))
            return
        source, g = self.source(name), self.granularity
        source = source.fetch() if isinstance(source, Streamed | Sharded) else source
        fold_tensor_(p, source.to(device=p.device), g.broadcast(name).to(p.device), g.space)

    @torch.no_grad()
    def folded_tensor(self, name: str, w0: torch.Tensor) -> torch.Tensor:
        """State-dict entry ``name`` of ``fold()`` computed alone from the base's ``w0``: a new tensor where it is
        merged, ``w0`` itself otherwise. What writing the fold tensor by tensor reads (``export.save_folded``):
        no folded model beside the base. Not for per-task heads or experts' added tokens (``fold`` builds those)."""
        if len(self.heads) or self.added is not None:
            raise AdamergeError("per-task heads and added tokens are folded into a model (fold()), not by tensor")
        if name not in self.merged_set:
            return w0
        p = w0.clone()
        self._fold_tensor(name, p)
        return p
