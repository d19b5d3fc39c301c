"""Offloaded stacks, LoRA factor space and the in-place fold against the paths they replace (CPU).

Each configuration runs in a fresh process (peak RSS is its own; glibc's mmap threshold is pinned
at 128 KiB so that RSS follows live tensors) on the step benchmark's model, batch and loss::

    .venv/bin/python benchmarks/engine_paths.py [--experts 8] [--rank 16] [--steps 5]

- ``dense`` / ``offload``: layer-wise entropy steps with the stacks as buffers / with
  ``TaskVectors.offload()``. On a CPU the device is the host, so what offload changes is what
  autograd keeps for backward: the bytes of distinct storages saved during a step's forward are
  what a GPU would have to hold on to (the dense path keeps every stack; offload, none).
- ``lora-factors`` / ``lora-dense``: K LoRA adapters (rank r on every attention and MLP projection)
  loaded from directories as factors, and the same task vectors densified (what peft's
  ``merge_and_unload`` gave before).
- ``fold``: ``MergedModel.fold()`` (each tensor ``addmm_``-ed into the copy) against building
  ``merged_weights()`` and copying it in (the fold before).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from step_bench import INIT, THREADS, entropy_loss, make_base, make_batch, make_expert, proc_status, reset_peak  # noqa: E402

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn`` runs."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def stack_bytes(tv) -> int:
    dense = sum(s.numel() * s.element_size() for s in tv.stacks.values())
    return dense + sum(f.left.numel() * f.left.element_size() + f.right.numel() * f.right.element_size()
                       for f in tv.factors.values())


def save_adapters(base, root: str, k: int, rank: int) -> dict[str, str]:
    """K LoRA adapters with random A and B (peft's init leaves B = 0)."""
    from peft import LoraConfig, get_peft_model

    dirs = {}
    for i in range(k):
        model = get_peft_model(copy.deepcopy(base), LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                                               target_modules=LORA_TARGETS))
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * p.shape[-1] ** -0.5 * 0.1)
        dirs[f"e{i}"] = f"{root}/e{i}"
        model.save_pretrained(dirs[f"e{i}"])
    return dirs


def task_vectors(config: str, k: int, rank: int, base):
    from adamerge import ExpertPool

    if config.startswith("lora"):
        with tempfile.TemporaryDirectory() as root:
            pool = ExpertPool(base, save_adapters(base, root, k, rank))
            tv = pool.task_vectors()
        return pool, tv.densified("benchmark: the dense baseline") if config == "lora-dense" else tv
    pool = ExpertPool(base, {f"e{i}": (lambda i=i: make_expert(base, i)) for i in range(k)})
    tv = pool.task_vectors()
    return pool, tv.offload() if config == "offload" else tv


def fold_by_copy(merged):
    """The fold before: every merged tensor built first, then copied into a deep copy of the base."""
    folded = copy.deepcopy(merged.base)
    params = dict(folded.named_parameters())
    with torch.no_grad():
        for name, value in merged.merged_weights().items():
            params[name].copy_(value)
    return folded


def timed_peak(fn, reps: int = 3) -> tuple[float, float]:
    """Median seconds of ``fn`` and the peak RSS above the RSS before it (MB)."""
    times, peaks = [], []
    for _ in range(reps):
        before = proc_status("VmRSS")
        reset_peak()
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
        peaks.append(proc_status("VmHWM") - before)
        del out
    return statistics.median(times), max(peaks)


def measure(config: str, k: int, rank: int, steps: int) -> dict:
    from adamerge import Layer, MergedModel

    torch.set_num_threads(THREADS)
    base = make_base()
    t = time.perf_counter()
    pool, tv = task_vectors(config, k, rank, base)
    result = {"build s": time.perf_counter() - t, "task vectors MB": stack_bytes(tv) / 1e6}
    merged = MergedModel(pool.base, tv, Layer(init=INIT))
    optimizer = torch.optim.Adam(merged.granularity.parameters(), lr=1e-3)
    batch = make_batch()
    if config == "fold":
        result["fold in place s"], result["fold in place peak MB"] = timed_peak(merged.fold)
        result["fold by copy s"], result["fold by copy peak MB"] = timed_peak(lambda: fold_by_copy(merged))
        return result

    def step():
        loss = entropy_loss(merged(input_ids=batch).logits)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up
    result["saved for backward MB"] = saved_bytes(lambda: entropy_loss(merged(input_ids=batch).logits)) / 1e6
    rss = proc_status("VmRSS")
    reset_peak()
    times, cpu = [], []
    for _ in range(steps):
        t, c = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    result.update({"step s": statistics.median(times), "step CPU-s": statistics.median(cpu),
                   "RSS between steps MB": rss, "step peak above MB": proc_status("VmHWM") - rss,
                   "peak RSS MB": proc_status("VmHWM")})
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--config", help="measure one configuration in this process (used by the driver)")
    args = parser.parse_args()
    if args.config:
        print(json.dumps(measure(args.config, args.experts, args.rank, args.steps)))
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
    rows = {}
    for config in ("dense", "offload", "lora-factors", "lora-dense", "fold"):
        out = subprocess.run([sys.executable, __file__, "--config", config, "--experts", str(args.experts),
                              "--rank", str(args.rank), "--steps", str(args.steps)],
                             env=env, capture_output=True, text=True, check=True)
        rows[config] = json.loads(out.stdout.strip().splitlines()[-1])
        print(config, json.dumps({key: round(v, 3) for key, v in rows[config].items()}), flush=True)
    report(rows, args)


def report(rows: dict, args) -> None:
    keys = ["task vectors MB", "saved for backward MB", "step s", "step CPU-s", "RSS between steps MB",
            "step peak above MB", "peak RSS MB", "build s"]
    print(f"\nK={args.experts}, LoRA rank {args.rank}, {THREADS} threads\n")
    print("| config | " + " | ".join(keys) + " |\n" + "|---" * (len(keys) + 1) + "|")
    for config in ("dense", "offload", "lora-factors", "lora-dense"):
        print(f"| {config} | " + " | ".join(f"{rows[config][key]:.3g}" for key in keys) + " |")

    def ratio(a, b, key):
        return rows[a][key] / rows[b][key]

    print(f"\n- offload / dense: step time {ratio('offload', 'dense', 'step s'):.2f}x (CPU-s "
          f"{ratio('offload', 'dense', 'step CPU-s'):.2f}x), peak RSS "
          f"{ratio('offload', 'dense', 'peak RSS MB'):.2f}x, saved for backward "
          f"{rows['offload']['saved for backward MB']:.1f} vs {rows['dense']['saved for backward MB']:.1f} MB")
    print(f"- LoRA factors / densified: task vectors {ratio('lora-factors', 'lora-dense', 'task vectors MB'):.3f}x, "
          f"peak RSS {ratio('lora-factors', 'lora-dense', 'peak RSS MB'):.2f}x, step time "
          f"{ratio('lora-factors', 'lora-dense', 'step s'):.2f}x (CPU-s "
          f"{ratio('lora-factors', 'lora-dense', 'step CPU-s'):.2f}x)")
    fold = rows["fold"]
    print(f"- fold in place / by copy: time {fold['fold in place s'] / fold['fold by copy s']:.2f}x "
          f"({fold['fold in place s']:.3f} vs {fold['fold by copy s']:.3f} s), peak above "
          f"{fold['fold in place peak MB']:.0f} vs {fold['fold by copy peak MB']:.0f} MB")


if __name__ == "__main__":
    main()
