"""``pool.shard=true``: each of N ranks holds 1/N of every task-vector stack, as a DTensor.

The stacks are PyTorch distributed tensors (``torch.distributed.tensor``): a ``(K, rows, ...)``
stack is ``Shard(1)`` over a 1-D ``DeviceMesh`` of every rank, i.e. split along the rows of its
tensor (a parameter axis, never the expert axis); 0-d tensors stay ``Replicate``. The merge
``W0 + sum_k c_k tau_k`` is elementwise over the tensor, so a rank merges its own rows alone
(coefficients that vary along the rows are cut to them), and the merged rows are all-gathered
(``redistribute`` to ``Replicate``) into the weight its layer reads.

Gradients: under data parallelism each rank's gradient for a gathered weight is only its own
part of the sum over ranks, so it is declared ``Partial`` and the all-gather's backward is a
reduce-scatter: rank s receives ``sum_r g_r`` on its rows and forms ``<sum_r g_r[s], tau[s]>``.
DDP's all-reduce of the (replicated) coefficients' gradients then takes the mean over ranks,
``1/N sum_s <sum_r g_r[s], tau[s]> = 1/N sum_r <g_r, tau>``: exactly the gradient of the
unsharded DDP run, with no second reduction. LoRA factors are small and stay replicated.
Autograd keeps no gathered weight for backward (``regather_in_backward``): where backward needs one
it merges its rows and gathers it again, so the whole merged weights live during the forwards only.

Sharding happens inside ``Trainer.fit`` (the process group exists only there; Lightning's
``configure_model`` hook), and ``unshard`` gathers the stacks back into host memory at its end, so
the fold, the evaluation and the writing that follow work as with ``pool.offload=cpu``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from adamerge.errors import AdamergeError

if TYPE_CHECKING:  # torch.distributed.tensor costs ~1 s to import: only sharded runs import it
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor

SHARDED_DIM = 1  # of a (K, *shape) stack: the rows of its tensor


def check_shard(objective, recompute: bool, offload: bool, strategy: Any = "ddp") -> None:
    """What ``pool.shard=true`` cannot run with, said before anything is loaded."""
    if offload:
        raise AdamergeError("pool.shard=true splits the task vectors across ranks and pool.offload=cpu keeps all of "
                            "them in host memory: choose one")
    if isinstance(strategy, str) and strategy != "auto" and not strategy.startswith("ddp"):
        raise AdamergeError(f"pool.shard=true splits the task vectors over the ranks of data-parallel training: use "
                            f"trainer.strategy=ddp (or auto), not {strategy!r}")
    if not objective.supports_offload:
        raise AdamergeError(f"objective={type(objective).__name__.lower()} rewrites the task vectors themselves, next "
                            "to the coefficients; it does not take pool.shard=true")
    if recompute and getattr(objective, "positions", None) == "generated":
        raise AdamergeError("pool.shard=true with recompute=true gathers the weights in every forward, and greedy "
                            "continuations (objective.positions=generated) stop after a different number of "
                            "forwards on each rank: drop recompute=true or use positions=last or all")


def rank_mesh(device: torch.device) -> DeviceMesh | None:
    """A 1-D mesh over every rank of the default process group; None with a single process."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (dist.get_world_size(),))


def row_range(rows: int, ranks: int, rank: int) -> tuple[int, int]:
    """The rows ``rank`` holds: ``torch.chunk``'s pieces, as ``Shard`` places them (the last ranks may hold none)."""
    per = math.ceil(rows / ranks)
    start = min(rank * per, rows)
    return start, min(start + per, rows)


def contiguous_stride(shape: torch.Size) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


@dataclass(frozen=True)
class Sharded:
    """One tensor's task vectors: this rank's rows ``[start, stop)`` of its ``(K, *shape)`` stack."""

    stack: DTensor
    start: int
    stop: int

    @property
    def local(self) -> torch.Tensor:
        return self.stack.to_local()

    @property
    def split(self) -> bool:
        return self.stack.placements[0].is_shard()

    def rows(self, t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """This rank's rows of ``t`` (``W0``: dim 0, expanded coefficients: dim 1); a size-1 dim broadcasts."""
        if not self.split or t.shape[dim] == 1:
            return t
        return t.narrow(dim, self.start, self.stop - self.start)

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """The whole tensor from every rank's rows of it (all-gather). Its gradient is this rank's part of
        a sum over ranks (``Partial``): backward reduce-scatters it onto the rows this rank holds."""
        if not self.split:
            return local
        from torch.distributed.tensor import DTensor, Partial, Shard

        shape = self.stack.shape[1:]
        rows = DTensor.from_local(local, self.stack.device_mesh, [Shard(0)], run_check=False, shape=shape,
                                  stride=contiguous_stride(shape))
        return rows.full_tensor(grad_placements=[Partial()])

    def row(self, k: int) -> torch.Tensor:
        """Expert k's whole task vector (teacher mode)."""
        return self.gather(self.local[k])

    @torch.no_grad()
    def fetch(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The whole stack on ``device`` (default: this rank's), gathered one expert at a time."""
        device = self.local.device if device is None else device
        return torch.stack([self.row(k).to(device) for k in range(self.local.shape[0])])

    def local_bytes(self) -> int:
        return self.local.numel() * self.local.element_size()


def shard_stack(stack: torch.Tensor, mesh: DeviceMesh, device: torch.device) -> Sharded:
    """This rank's rows of ``stack``, copied to ``device`` (so that the whole stack can be freed).
    Every rank built the same stacks (same files, same seed), so no data travels between ranks."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if stack.dim() < 2:  # a 0-d tensor's stack: nothing to split
        return Sharded(DTensor.from_local(stack.to(device), mesh, [Replicate()], run_check=False), 0, 1)
    start, stop = row_range(stack.shape[SHARDED_DIM], mesh.size(), mesh.get_local_rank())
    rows = stack.narrow(SHARDED_DIM, start, stop - start)
    local = torch.empty(rows.shape, dtype=stack.dtype, device=device).copy_(rows)
    placed = DTensor.from_local(local, mesh, [Shard(SHARDED_DIM)], run_check=False, shape=stack.shape,
                                stride=contiguous_stride(stack.shape))
    return Sharded(placed, start, stop)


def regather_in_backward(gathered: dict[str, torch.Tensor], regather: Callable[[str], torch.Tensor]):
    """Saved-tensor hooks for one forward: a gathered weight (or a view of it) that autograd saves for backward
    is kept as its name instead, and gathered again (``regather``, without gradient) when backward reads it. The
    whole weights then live from the merge to the end of the forward, not until backward is done. A copy made
    from one (a dtype cast under autocast) is an ordinary tensor and stays."""
    storages = {w.untyped_storage().data_ptr(): (n, w.storage_offset()) for n, w in gathered.items()
                if w.is_contiguous()}  # a view is rebuilt on a contiguous gather

    def pack(t: torch.Tensor):
        found = storages.get(t.untyped_storage().data_ptr())
        if found is None:
            return t
        name, start = found
        return name, t.shape, t.stride(), t.storage_offset() - start

    def unpack(saved):
        if isinstance(saved, torch.Tensor):
            return saved
        name, shape, stride, offset = saved
        with torch.no_grad():
            return regather(name).contiguous().as_strided(shape, stride, offset)

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)

