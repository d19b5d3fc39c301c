"""Folding a task-arithmetic merge of a ~127M-parameter (508 MB fp32) Llama to disk: adamerge's side.

``make`` writes a seeded base and K experts as safetensors HF directories; ``adamerge`` runs
task arithmetic (``Task(init=0.3)``, ``MergedModel.fold()``, ``save_folded``) on them and prints one
JSON line with the phases. ``compare`` checks that two folded checkpoints hold the same tensors.
The driver (``run_all.py``) times the whole process of this script and of ``mergekit-yaml`` on the
same directories::

    python benchmarks/fold_bench.py make DIR --experts 2
    python benchmarks/fold_bench.py adamerge DIR OUT --experts 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

T_START = time.perf_counter()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

FOLD_MODEL = dict(vocab_size=32000, hidden_size=768, intermediate_size=1792, num_hidden_layers=12,
                  num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=2048,
                  tie_word_embeddings=False)
LAMBDA = 0.3


def make(root: Path, k: int) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from step_bench import make_base, make_expert

    base = make_base(FOLD_MODEL)
    base.save_pretrained(root / "base")
    for i in range(k):
        make_expert(base, i).save_pretrained(root / f"e{i}")
    print(json.dumps({"params": sum(p.numel() for p in base.parameters())}))


def fold_adamerge(root: Path, out: Path, k: int) -> None:
    phases = {}
    torch.set_num_threads(2)
    t = time.perf_counter()
    from adamerge import ExpertPool, MergedModel, Task
    from adamerge.export import save_folded

    phases["import"] = time.perf_counter() - T_START
    t = time.perf_counter()
    experts = {f"e{i}": str(root / f"e{i}") for i in range(k)}
    pool = ExpertPool(str(root / "base"), experts)
    phases["load base"] = time.perf_counter() - t
    t = time.perf_counter()
    task_vectors = pool.task_vectors()
    phases["task vectors (load experts)"] = time.perf_counter() - t
    t = time.perf_counter()
    merged = MergedModel(pool.base, task_vectors, Task(init=LAMBDA))
    folded = merged.fold()
    phases["fold"] = time.perf_counter() - t
    t = time.perf_counter()
    save_folded(folded, out, base_source=str(root / "base"), experts=experts,
                coefficients=merged.granularity.table(), details={"granularity": "task", "init": LAMBDA})
    phases["save_folded"] = time.perf_counter() - t
    print(json.dumps({"phases_s": phases}))


def mergekit_config(root: Path, k: int) -> str:
    models = "".join(f"  - model: {root / f'e{i}'}\n    parameters:\n      weight: {LAMBDA}\n" for i in range(k))
    return (f"merge_method: task_arithmetic\nbase_model: {root / 'base'}\nparameters:\n  normalize: false\n"
            f"dtype: float32\nmodels:\n{models}")


def compare(a: Path, b: Path) -> None:
    """Max |difference| between the tensors of two checkpoints (same names expected)."""
    from safetensors import safe_open

    def tensors(d: Path) -> dict:
        out = {}
        for f in sorted(d.glob("model*.safetensors")):
            with safe_open(str(f), "pt") as h:
                out.update({n: h.get_tensor(n) for n in h.keys()})  # noqa: SIM118 (safe_open is not a dict)
        return out

    ta, tb = tensors(a), tensors(b)
    diff = max(float((ta[n].float() - tb[n].float()).abs().max()) for n in ta) if ta.keys() == tb.keys() else None
    print(json.dumps({"same_names": ta.keys() == tb.keys(), "max_abs_diff": diff,
                      "only_in_first": sorted(set(ta) - set(tb))[:5], "only_in_second": sorted(set(tb) - set(ta))[:5]}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("make")
    p.add_argument("root", type=Path)
    p.add_argument("--experts", type=int, default=2)
    p = sub.add_parser("adamerge")
    p.add_argument("root", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--experts", type=int, default=2)
    p = sub.add_parser("mergekit-config")
    p.add_argument("root", type=Path)
    p.add_argument("--experts", type=int, default=2)
    p = sub.add_parser("compare")
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    args = parser.parse_args(argv)
    if args.cmd == "make":
        make(args.root, args.experts)
    elif args.cmd == "adamerge":
        fold_adamerge(args.root, args.out, args.experts)
    elif args.cmd == "mergekit-config":
        print(mergekit_config(args.root, args.experts), end="")
    else:
        compare(args.a, args.b)
    return 0


if __name__ == "__main__":
    sys.exit(main())
