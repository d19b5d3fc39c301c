"""MergedModel: the base architecture run with merged weights computed from trainable coefficients.

Like peft's tuners it wraps a frozen model and can always hand back a plain one (``fold``). Each
merged tensor is built once per forward as one fused reduction over the K experts (a GEMV when
the granularity gives one scalar per expert), so autograd reads each task vector once more in
backward to produce the coefficient gradient, and nothing else.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from adamerge.errors import AdamergeError
from adamerge.granularity import Granularity
from adamerge.taskvectors import TaskVectors


def merge_tensor(w0: torch.Tensor, stack: torch.Tensor, coef: torch.Tensor, space: str = "task_vectors"):
    """``W0 + sum_k c_k * tau_k`` (task-vector space) or ``sum_k c_k * (W0 + tau_k)`` (weight space).

    ``stack`` is ``(K, *w0.shape)``; ``coef`` broadcasts against it. One scalar per expert takes the
    GEMV path, which never materializes a ``(K, *shape)`` temporary.
    """
    k = stack.shape[0]
    if coef.numel() == k:
        delta = (coef.reshape(1, k).to(stack.dtype) @ stack.reshape(k, -1)).reshape(w0.shape)
    else:  # type promotion: fp32 coefficients accumulate reduced-precision stacks in fp32
        delta = (coef * stack).sum(0)
    if space == "weights":
        return w0 * coef.sum(0).to(w0.dtype) + delta.to(w0.dtype)
    return w0 + delta.to(w0.dtype)


class MergedModel(nn.Module):
    """Frozen base + stacked task vectors + a granularity's coefficients; ``forward`` is the base's.

    Args:
        base: the base model; its parameters are W0 and stay frozen.
        task_vectors: the stacks, one per merged tensor (names as in ``base.named_parameters()``).
        granularity: owns the coefficients; ``setup`` is called here for these experts and tensors.
        recompute: keep neither merged weights nor activations for backward; rebuild both there
            (activation checkpointing of the whole forward), for when the merged copy does not fit.
    """

    def __init__(self, base: nn.Module, task_vectors: TaskVectors, granularity: Granularity,
                 recompute: bool = False) -> None:
        super().__init__()
        self.recompute = recompute
        self.base = base.requires_grad_(False)
        self.experts = list(task_vectors.experts)
        self.names = list(task_vectors.stacks)
        self.granularity = granularity
        granularity.setup(self.experts, [task_vectors.infos[n] for n in self.names])
        self.task_vectors = nn.Module()  # a namespace so that .to(device) moves the stacks
        for name, stack in task_vectors.stacks.items():
            self.task_vectors.register_buffer(name.replace(".", "/"), stack, persistent=False)
        self.heads = nn.ModuleDict()  # expert -> its task head (frozen buffers), for classifiers
        for expert, head in task_vectors.heads.items():
            self.heads[expert.replace(".", "/")] = nn.Module()
            for name, value in head.items():
                self.heads[expert.replace(".", "/")].register_buffer(name.replace(".", "/"), value, persistent=False)
        self.head_configs = dict(task_vectors.head_configs)
        self._expert: int | None = None  # teacher mode: exactly this expert
        self._task: int | None = None  # whose head answers (classifiers)

    def stack(self, name: str) -> torch.Tensor:
        return getattr(self.task_vectors, name.replace(".", "/"))

    def replace_stack(self, name: str, stack: torch.Tensor) -> None:
        """Swap in adjusted task vectors (DOGE); the old tensor is not modified, it may be shared."""
        self.task_vectors.register_buffer(name.replace(".", "/"), stack, persistent=False)

    def merged_weights(self) -> dict[str, torch.Tensor]:
        """Merged value of every merged tensor (exactly expert k's in teacher mode)."""
        w0 = dict(self.base.named_parameters())
        if self._expert is not None:
            weights = {n: w0[n] + self.stack(n)[self._expert].to(w0[n].dtype) for n in self.names}
        else:
            g = self.granularity
            weights = {n: merge_tensor(w0[n], self.stack(n), g.broadcast(n), g.space) for n in self.names}
        return {**weights, **self.head_weights()}

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
        return functional_call(self.base, self.merged_weights(), args, kwargs, tie_weights=True, strict=False)

    def index(self, expert: int | str) -> int:
        k = self.experts.index(expert) if expert in self.experts else expert
        if not isinstance(k, int) or not 0 <= k < len(self.experts):
            raise AdamergeError(f"no expert {expert!r}; the pool has {self.experts}")
        return k

    @contextmanager
    def as_expert(self, expert: int | str) -> Iterator[MergedModel]:
        """Teacher mode: run as expert k exactly (W0 + tau_k, with its head), without loading it again."""
        previous, self._expert = self._expert, self.index(expert)
        try:
            yield self
        finally:
            self._expert = previous

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
        """
        if task is not None and len(self.heads):
            with self.task(task):
                weights = self.merged_weights()
            folded = type(self.base)(self.head_configs[self.experts[self.index(task)]]).to(self.base.dtype)
            folded.load_state_dict({**self.base.state_dict(), **weights}, strict=True)
            return folded.eval()
        folded = copy.deepcopy(self.base)
        params = dict(folded.named_parameters())
        for name, value in self.merged_weights().items():
            params[name].copy_(value)
        return folded
