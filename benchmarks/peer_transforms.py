"""Task-vector transforms next to FusionBench's and mergekit's implementations, on the same tiny task vectors.

adamerge's side (this venv) builds the task vectors of a tiny Llama and a tiny GPT-2 (Conv1D, tied
embeddings) with three seeded experts (tests/conftest.py), saves each expert's task vectors as
safetensors, and starts this same file with FusionBench's interpreter (``--peer``, which imports only
torch, safetensors and fusion_bench, never adamerge). FusionBench merges them with its own functions:
TSV-M (``task_singular_vector/utils/TSVM_utils.compute_and_sum_svd_mem_reduction``), ISO-C and ISO-CTS
(``isotropic_merging/iso_utils.iso_c`` / ``iso_cts``, common fraction 0.8) and Model Stock's ratio
(``model_stock/model_stock.compute_angle`` + ``compute_ratio``, the mean pairwise angle for K = 3).
mergekit (its own interpreter) merges the first two experts with ``merge_methods/slerp.slerp`` at t = 0.3.
adamerge's merged task vector is the sum of the pieces ``pool.preprocess`` makes (coefficients 1).
It prints the max abs difference per method next to the largest merged entry.

    .venv/bin/python benchmarks/peer_transforms.py --fusionbench benchmarks/.venv-fusionbench/bin/python \
        --mergekit benchmarks/.venv-mergekit/bin/python
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
METHODS = ("tsv", "iso_c", "iso_cts", "model_stock")
SLERP_T = 0.3


def run_fusionbench(job: dict) -> None:
    from fusion_bench.method.isotropic_merging.iso_utils import iso_c, iso_cts
    from fusion_bench.method.model_stock.model_stock import compute_angle, compute_ratio
    from fusion_bench.method.task_singular_vector.utils.TSVM_utils import compute_and_sum_svd_mem_reduction
    from safetensors.torch import load_file, save_file

    tvs = [load_file(f) for f in job["experts"]]
    with contextlib.redirect_stdout(io.StringIO()):  # their progress prints
        merged = {"tsv": compute_and_sum_svd_mem_reduction(tvs, accelerator="cpu"),
                  "iso_c": iso_c(tvs, accelerator="cpu"), "iso_cts": iso_cts(tvs, 0.8, accelerator="cpu")}
    zero = {n: torch.zeros_like(v) for n, v in tvs[0].items()}
    angles: dict[str, list[float]] = {}
    for i in range(len(tvs)):
        for j in range(i + 1, len(tvs)):
            for n, a in compute_angle(tvs[i], tvs[j], zero).items():
                angles.setdefault(n, []).append(a)
    ratio = compute_ratio({n: sum(a) / len(a) for n, a in angles.items()}, k=len(tvs))
    merged["model_stock"] = {n: float(ratio[n]) * sum(tv[n] for tv in tvs) / len(tvs) for n in zero}
    for method, tensors in merged.items():
        save_file({n: v.contiguous() for n, v in tensors.items()}, job["out"][method])


def run_mergekit(job: dict) -> None:
    from mergekit.merge_methods.slerp import slerp
    from safetensors.torch import load_file, save_file

    base, a, b = (load_file(f) for f in (job["base"], *job["experts"][:2]))
    t = torch.tensor([SLERP_T])
    save_file({n: (slerp(t, (base[n] + a[n])[None], (base[n] + b[n])[None])[0] - base[n]).contiguous() for n in a},
              job["out"]["slerp"])


def adamerge_rows(root: Path, fusionbench: Path, mergekit: Path) -> list[tuple]:
    sys.path.insert(0, str(HERE.parent / "tests"))
    from conftest import make_family
    from safetensors.torch import load_file, save_file

    from adamerge.taskvectors import preprocess

    rows = []
    for family in ("llama", "gpt2"):
        tv = make_family(family).pool().task_vectors()
        experts = []
        for k, expert in enumerate(tv.experts):
            experts.append(str(root / f"{family}-{expert}.safetensors"))
            save_file({n: tv.stacks[n][k].contiguous() for n in tv.names}, experts[-1])
        save_file({n: tv.base[n].contiguous() for n in tv.names}, str(root / f"{family}-base.safetensors"))
        methods = {m: fusionbench for m in METHODS if fusionbench.exists()}
        methods.update({"slerp": mergekit} if mergekit.exists() else {})
        job = {"experts": experts, "base": str(root / f"{family}-base.safetensors"),
               "out": {m: str(root / f"{family}-peer-{m}.safetensors") for m in methods}}
        (root / "job.json").write_text(json.dumps(job))
        for peer in set(methods.values()):
            kind = "mergekit" if peer == mergekit else "fusionbench"
            subprocess.run([str(peer), __file__, "--peer", kind, str(root / "job.json")], check=True)
        two = replace(tv, experts=tv.experts[:2], stacks={n: s[:2] for n, s in tv.stacks.items()})
        for method in methods:
            theirs = load_file(job["out"][method])
            ours = {n: s.sum(0) for n, s in (preprocess(two, "slerp", slerp_t=SLERP_T) if method == "slerp"
                                             else preprocess(tv, method)).stacks.items()}
            diff = max((ours[n] - theirs[n]).abs().max().item() for n in ours)
            rows.append((family, method, diff, max(v.abs().max().item() for v in theirs.values()), len(ours)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fusionbench", type=Path, default=HERE / ".venv-fusionbench" / "bin" / "python")
    parser.add_argument("--mergekit", type=Path, default=HERE / ".venv-mergekit" / "bin" / "python")
    parser.add_argument("--peer", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.peer:
        job = json.loads(Path(args.peer[1]).read_text())
        (run_mergekit if args.peer[0] == "mergekit" else run_fusionbench)(job)
        return
    for missing in (p for p in (args.fusionbench, args.mergekit) if not p.exists()):
        print(f"skipped: no {missing}")
    with tempfile.TemporaryDirectory() as tmp:
        rows = adamerge_rows(Path(tmp), args.fusionbench, args.mergekit)
    print("| family | method | max abs diff | max abs merged entry | tensors |")
    print("|---|---|---|---|---|")
    for family, method, diff, scale, n in rows:
        print(f"| {family} | {method} | {diff:.2e} | {scale:.3f} | {n} |")


if __name__ == "__main__":
    main()
