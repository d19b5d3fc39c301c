"""Learned merging of a ~1.1B-parameter Llama (random init, TinyLlama's shape) with K=8 experts in bf16 on GPUs:
one device, ``pool.offload=cpu``, and ``pool.shard=true`` over every visible GPU. A benchmark to run where GPUs
are lent, never in CI (it is not a test)::

    python benchmarks/sharded_gpu.py                 # the three modes, one fresh process each, a table at the end
    python benchmarks/sharded_gpu.py --mode sharded  # one mode (the driver calls this)

Each mode runs layer-wise entropy AdaMerging (``Trainer.fit``, Adam, fp32 coefficients, bf16 base and task vectors)
for ``--steps`` steps on random token batches and prints one JSON line: the peak accelerator memory allocated (the
largest over the ranks), the median step time after two warm-up steps and the task-vector bytes each rank holds.
The sharded mode starts one process per GPU (Lightning's DDP launcher runs this script again for ranks 1..N-1);
every process builds the whole stacks in host memory first (K x 2.2 GB), and keeps only its rows on its GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # adamerge from this checkout
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from step_bench import make_base, make_expert  # noqa: E402

from adamerge.granularity import Layer  # noqa: E402
from adamerge.merged import MergedModel  # noqa: E402
from adamerge.objectives import Entropy  # noqa: E402
from adamerge.pool import ExpertPool  # noqa: E402
from adamerge.training import MergeModule  # noqa: E402

MODEL = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
             num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False)  # TinyLlama-1.1B's shape
EXPERTS, BATCH, SEQ = 8, 4, 512
MODES = ("single", "offload", "sharded")


class Batches(torch.utils.data.Dataset):
    """Random token batches (one task), seeded by index: every process sees the same data set."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        ids = torch.randint(0, MODEL["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(i))
        mask = torch.ones_like(ids)
        return {"bench": {"input_ids": ids, "attention_mask": mask, "position_ids": mask.cumsum(1) - 1}}


class Measure(pl.Callback):
    """Peak accelerator memory from the first step on; step times with the device synchronized; the
    task-vector bytes on this rank's GPU (none under offload: they stay in host memory)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.stack_bytes = 0

    def on_train_start(self, trainer, module) -> None:
        merged = module.merged
        self.stack_bytes = sum(s.local_bytes() for s in merged.sharded.values()) or sum(
            b.numel() * b.element_size() for b in merged.task_vectors.buffers())
        torch.cuda.reset_peak_memory_stats()

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        torch.cuda.synchronize()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._start)


def run_mode(mode: str, steps: int) -> None:
    """One mode in this process (under ``sharded``: this rank); rank 0 prints the JSON line."""
    base = make_base(MODEL).to(torch.bfloat16)
    pool = ExpertPool(base, {f"e{k}": (lambda k=k: make_expert(base, k)) for k in range(EXPERTS)})
    task_vectors = pool.task_vectors(dtype=torch.bfloat16)
    if mode == "offload":
        task_vectors = task_vectors.offload()
    merged = MergedModel(pool.base, task_vectors, Layer(init=0.3), shard=mode == "sharded")
    del pool, task_vectors
    module = MergeModule(merged, Entropy(positions="all"), {"name": "adam", "lr": 1e-3})
    measure = Measure()
    devices = torch.cuda.device_count() if mode == "sharded" else 1
    trainer = pl.Trainer(accelerator="gpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                         max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[measure])
    trainer.fit(module, torch.utils.data.DataLoader(Batches(steps * devices), batch_size=None))
    peak = torch.tensor([torch.cuda.max_memory_allocated()], device="cuda")
    if dist.is_initialized():
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    if trainer.global_rank == 0:
        print(json.dumps({"mode": mode, "devices": devices, "experts": EXPERTS, "tv_dtype": "bfloat16",
                          "parameters": sum(p.numel() for p in merged.base.parameters()),
                          "peak_allocated_gib": round(peak.item() / 2**30, 2),
                          "step_s_median": round(statistics.median(measure.times[2:]), 3),
                          "stack_gib_per_rank": round(measure.stack_bytes / 2**30, 2)}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=MODES, help="one mode in this process (default: all, one process each)")
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("sharded_gpu.py measures accelerator memory: it needs a CUDA GPU")
    if args.mode:
        run_mode(args.mode, args.steps)
        return
    for mode in MODES:
        subprocess.run([sys.executable, __file__, "--mode", mode, "--steps", str(args.steps)], check=True)


if __name__ == "__main__":
    main()
