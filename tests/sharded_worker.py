"""One rank of a ``pool.shard=true`` run on the tiny zoo, for tests/test_sharding.py.

Started once per rank by the test (as ``torchrun`` would: ``LOCAL_RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``/``MASTER_PORT`` set), so Lightning's DDP strategy joins these processes instead of
launching its own. For each case of ``CASES`` it trains the tiny merge a few steps with the stacks
sharded over the ranks (gloo on CPU), then rank 0 alone writes the per-step loss averaged over the
ranks, the coefficients, the folded weights and every rank's stack bytes::

    python tests/sharded_worker.py OUT_DIR
"""

from __future__ import annotations

import json
import sys
import weakref
from dataclasses import replace
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from tiny import build_module, quiet_trainer, tiny_parts
from torch.distributed.tensor import Shard, distribute_tensor

from adamerge.sharding import Sharded, rank_mesh, shard_stack
from adamerge.taskvectors import LoraFactors, TaskVectors

STEPS = 4
BATCH = 8  # the global batch: BATCH // ranks rows per rank
# name -> (granularity, objective, task-vector dtype, MLP task vectors as LoRA factors)
CASES = {
    "layer-entropy-lora": ({"name": "layer"}, {"name": "entropy", "positions": "last"}, None, True),
    "chunk-entropy-bf16": ({"name": "chunk", "chunks": {"*": 3}}, {"name": "entropy", "positions": "last"},
                           torch.bfloat16, False),
    "column-align-online": ({"name": "column"}, {"name": "align", "positions": "generated", "new_tokens": 3,
                                                 "teacher": "online", "coef_reg": 0.01}, None, False),
    "block-dam-weights": ({"name": "block", "partitions": 2, "space": "weights", "init": 0.5},
                          {"name": "dam", "positions": "last"}, torch.bfloat16, False),
}


def with_lora_mlp(tv: TaskVectors, rank: int = 4) -> TaskVectors:
    """The MLP matrices' task vectors as rank-``rank`` LoRA factors (each expert's truncated SVD), the others
    dense: a merge with sources of both kinds (the factors stay whole on every rank)."""
    factors, k = {}, tv.num_experts
    for name, stack in tv.stacks.items():
        if ".mlp." in name:
            u, s, vh = torch.linalg.svd(stack, full_matrices=False)
            left, right = u[:, :, :rank] * s[:, None, :rank], vh[:, :rank]
            factors[name] = LoraFactors(torch.cat(list(left), 1), torch.cat(list(right)),
                                        torch.arange(k).repeat_interleave(rank), k)
    return replace(tv, stacks={n: s for n, s in tv.stacks.items() if n not in factors}, factors=factors)


class Alive:
    """Bytes of whole weights gathered from shards (``Sharded.gather``) still referenced; the most of them at any
    time during a backward (at its start, and whenever backward gathers one again)."""

    now = backward_peak = 0
    in_backward = False

    @classmethod
    def track(cls, gather):
        def tracked(self, local):
            full = gather(self, local)
            if full is not local:
                size = full.numel() * full.element_size()
                cls.now += size
                weakref.finalize(full, cls.freed, size)
                cls.seen()
            return full
        return tracked

    @classmethod
    def freed(cls, size: int) -> None:
        cls.now -= size

    @classmethod
    def seen(cls) -> None:
        if cls.in_backward:
            cls.backward_peak = max(cls.backward_peak, cls.now)


class Record(pl.Callback):
    """The loss of each step averaged over the ranks, this rank's stack bytes while training, the bytes of
    the whole merged weights and the most of them alive during a backward."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.local_bytes = self.whole_stacks = self.merged_bytes = 0

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        Alive.in_backward = True
        Alive.seen()

    def on_after_backward(self, trainer, pl_module) -> None:
        Alive.in_backward = False

    def on_train_start(self, trainer, pl_module) -> None:
        self.local_bytes = sum(s.local_bytes() for s in pl_module.merged.sharded.values())
        self.whole_stacks = len(list(pl_module.merged.task_vectors.buffers()))  # none left once sharded
        self.merged_bytes = sum(p.numel() * p.element_size() for n, p in pl_module.merged.base.named_parameters()
                                if n in pl_module.merged.sharded)
        Alive.backward_peak = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"].detach().clone()
        if dist.is_initialized():
            dist.all_reduce(loss)
            loss /= dist.get_world_size()
        self.losses.append(loss.item())


def train(case: str, ranks: int) -> tuple[dict, dict[str, torch.Tensor]]:
    """Train ``case`` on ``ranks`` processes (1: no sharding); returns (record, tensors) of the run."""
    granularity, objective, tv_dtype, lora = CASES[case]
    parts = tiny_parts()
    if tv_dtype is not None:
        parts.task_vectors = parts.task_vectors.to(dtype=tv_dtype)
    if lora:
        parts.task_vectors = with_lora_mlp(parts.task_vectors)
    merged, data, module = build_module(parts, granularity, objective, batch_size=BATCH // ranks,
                                        shard=ranks > 1)
    whole_bytes = sum(s.numel() * s.element_size() for s in parts.task_vectors.stacks.values())
    del parts  # the stacks live in the merged model alone: sharding frees the whole ones
    record = Record()
    trainer = quiet_trainer(STEPS, devices=ranks, callbacks=[record], **({"strategy": "ddp"} if ranks > 1 else {}))
    trainer.fit(module, datamodule=data)
    folded = merged.fold().state_dict()
    tensors = {f"coef.{k}": v for k, v in merged.granularity.table().items()}
    tensors.update({f"folded.{k}": v.contiguous() for k, v in folded.items()})
    bytes_per_rank = [record.local_bytes]
    if dist.is_initialized():
        bytes_per_rank = [None] * dist.get_world_size()
        dist.all_gather_object(bytes_per_rank, record.local_bytes)
    return {"losses": record.losses, "bytes_per_rank": bytes_per_rank, "whole_bytes": whole_bytes,
            "whole_stacks_while_training": record.whole_stacks, "merged_bytes": record.merged_bytes,
            "gathered_backward_peak": Alive.backward_peak, "lora_tensors": len(merged.lora)}, tensors


def uneven_rows() -> dict:
    """A (2, 5, 3) stack over the ranks (5 rows: uneven): this rank's rows are the ones ``distribute_tensor``
    places here, gathering a merge of them gives the whole merge, and the coefficient gradient summed over
    ranks is the whole one (rank r's loss weighs the merged tensor by r + 1)."""
    stack = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(0))
    mesh = rank_mesh(torch.device("cpu"))
    sharded = shard_stack(stack, mesh, torch.device("cpu"))
    placed = distribute_tensor(stack, mesh, [Shard(1)], src_data_rank=None).to_local()
    coef = torch.tensor([0.3, 0.7], requires_grad=True)
    merged = sharded.gather(torch.einsum("k,krc->rc", coef, sharded.local))
    (merged * (dist.get_rank() + 1)).sum().backward()
    grad = coef.grad.clone()
    dist.all_reduce(grad)
    whole_grad = sum(range(1, dist.get_world_size() + 1)) * stack.sum((1, 2))
    return {"rows_as_dtensor": torch.equal(sharded.local, placed),
            "merge_error": (merged - torch.einsum("k,krc->rc", coef, stack)).abs().max().item(),
            "grad_error": (grad - whole_grad).abs().max().item()}


def main(out: Path) -> None:
    Sharded.gather = Alive.track(Sharded.gather)
    for case in CASES:
        record, tensors = train(case, ranks=2)
        if dist.get_rank() == 0:
            save_file(tensors, str(out / f"{case}.safetensors"))
            (out / f"{case}.json").write_text(json.dumps(record))
    uneven = uneven_rows()  # the process group exists now (Lightning set it up)
    if dist.get_rank() == 0:
        (out / "uneven.json").write_text(json.dumps(uneven))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
