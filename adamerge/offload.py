"""``pool.offload=cpu``: task-vector stacks stay in host memory and visit the device one at a time.

Accelerator memory then holds the base, the coefficients, the merged weights and at most two
stacks (the one in use and the next, prefetched on a side CUDA stream), whatever K is. On a CPU
the "copy" is the host tensor itself, so the same code runs (and is tested) without a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class HostStacks:
    """Stacks in (pinned) host memory; ``fetch`` hands one out on the device, prefetching a neighbour.

    Forward walks the tensors in order (prefetch ``step=1``), the coefficient gradient roughly in
    reverse (``step=-1``); a prefetch that is not asked for next is dropped, so at most one waits.
    """

    def __init__(self, stacks: dict[str, torch.Tensor]) -> None:
        self.stacks = stacks
        self._names = list(stacks)
        self._index = {n: i for i, n in enumerate(self._names)}
        self._pending: tuple[str, torch.Tensor, torch.cuda.Event] | None = None
        self._side: dict[torch.device, torch.cuda.Stream] = {}

    def fetch(self, name: str, device: torch.device, step: int = 1) -> torch.Tensor:
        """The stack of ``name`` on ``device``; starts copying the one ``step`` names further."""
        if device.type != "cuda":
            return self.stacks[name].to(device)
        pending, self._pending = self._pending, None
        copy, done = pending[1:] if pending is not None and pending[0] == name else self._copy(name, device)
        current = torch.cuda.current_stream(device)
        current.wait_event(done)
        copy.record_stream(current)  # allocated on the side stream, used (and freed) on this one
        ahead = self._index[name] + step
        if 0 <= ahead < len(self._names):
            self._pending = (self._names[ahead], *self._copy(self._names[ahead], device))
        return copy

    def _copy(self, name: str, device: torch.device) -> tuple[torch.Tensor, torch.cuda.Event]:
        side = self._side.setdefault(device, torch.cuda.Stream(device))
        with torch.cuda.stream(side):
            copy = self.stacks[name].to(device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(side)
        return copy, done

    def row(self, name: str, k: int, device: torch.device) -> torch.Tensor:
        """Expert k's task vector alone (teacher mode): one row crosses, not the stack."""
        return self.stacks[name][k].to(device)


@dataclass(frozen=True)
class Streamed:
    """One offloaded tensor's task vectors, bound for ``device``."""

    stacks: HostStacks
    name: str
    device: torch.device

    def fetch(self, step: int = 1) -> torch.Tensor:
        return self.stacks.fetch(self.name, self.device, step)
