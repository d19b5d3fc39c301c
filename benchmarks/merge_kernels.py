"""The merge's two passes over the task vectors, kernel by kernel, against one plain read of them.

For the step benchmark's model (every parameter tensor, K experts), CPU-seconds per whole-model pass:
the merge as ``merge_tensor`` computes it today and fused alternatives, the coefficient gradient as
autograd computes it and an alternative, for fp32 and bf16 stacks. Evidence for engine changes, not a
test of adamerge::

    .venv/bin/python benchmarks/merge_kernels.py --experts 8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from step_bench import MODEL, make_base  # noqa: E402


def cpu_time(fn, reps: int = 5) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.process_time()
        fn()
        times.append(time.process_time() - t)
    return statistics.median(times)


def kernels(w0: list, stacks: list, grads: list, c: torch.Tensor, dtype: torch.dtype) -> dict:
    """Whole-model passes (one call = every tensor once) for stacks stored in ``dtype``."""
    k = c.numel()
    flat = [s.to(dtype).view(k, -1) for s in stacks]
    cd = c.to(dtype)

    def chunked_fp32(w, f, n=1 << 20):  # fp32 accumulation over bf16 storage, 1M columns at a time
        return torch.cat([torch.addmv(wc, fc.t().float(), c) for wc, fc in
                          zip(w.view(-1).split(n), f.split(n, dim=1), strict=True)])

    return {
        "read once (sum)": lambda: [f.sum() for f in flat],
        "merge today: w0 + (c @ S)": lambda: [
            w + (cd.view(1, k) @ f).view(w.shape).to(w.dtype) for w, f in zip(w0, flat, strict=True)],
        "merge fused: addmm(w0, c, S)": lambda: [
            torch.addmm(w.view(1, -1).to(dtype), cd.view(1, k), f) for w, f in zip(w0, flat, strict=True)],
        "merge fp32 accumulate, 1M-column chunks": lambda: [
            chunked_fp32(w, f) for w, f in zip(w0, flat, strict=True)],
        "coef grad today: g @ S.T": lambda: [
            g.view(1, -1).to(dtype) @ f.t() for g, f in zip(grads, flat, strict=True)],
        "coef grad: mv(S, g)": lambda: [f @ g.view(-1).to(dtype) for g, f in zip(grads, flat, strict=True)],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=8)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    k = args.experts
    base = make_base(MODEL)
    gen = torch.Generator().manual_seed(0)
    w0 = [p.detach() for p in base.parameters()]
    stacks = [torch.randn((k, *w.shape), generator=gen) * 0.01 for w in w0]
    grads = [torch.randn(w.shape, generator=gen) for w in w0]
    c = torch.full((k,), 0.3)
    results = {}
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16):
            passes = kernels(w0, stacks, grads, c, dtype)
            results[str(dtype).removeprefix("torch.")] = {key: cpu_time(fn) for key, fn in passes.items()}
    print(json.dumps({"experts": k, "params": sum(w.numel() for w in w0), "cpu_s": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
