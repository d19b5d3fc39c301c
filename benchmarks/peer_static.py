"""Static merges next to their peers: mergekit and FusionBench's TIES on the same tiny saved models.

adamerge's side (this venv) saves a tiny Llama and a tiny GPT-2 (Conv1D, tied embeddings) base with
three seeded experts as safetensors directories, merges them with ``pool.preprocess`` (the engine's
``apply_preprocess``, a ``Task`` granularity at the per-expert weights, ``MergedModel.fold``), and
starts this same file with each peer's own interpreter (``--peer``), which imports only torch,
safetensors and the peer, never adamerge. It prints the max abs difference per method and tensor set.

- mergekit (``mergekit-yaml``'s ``run_merge``), unequal weights 0.5/0.3/0.8, against
  ``convention=mergekit``. mergekit draws DARE/DELLA masks with ``torch.bernoulli``; here its
  ``sparsify`` is wrapped so that each expert's delta (found by its bytes) gets the mask adamerge
  drew for it (``taskvectors.uniform_draw``), which tests everything but the draw itself: counts,
  ranks, keep probabilities (compared too: ``p_keep diff``), rescaling, election, normalization.
- FusionBench's TIES (``ties_merging_utils.ties_merging`` on the flattened task vectors, threshold 20,
  ``mean``, scaling 1) against ``convention=paper``; for Llama also ``TiesMergingAlgorithm.run``.

    .venv/bin/python benchmarks/peer_static.py \
        --mergekit benchmarks/.venv-mergekit/bin/python --fusionbench benchmarks/.venv-fusionbench/bin/python

A peer's interpreter that does not exist is reported as skipped. The ``paper (control)`` row merges
TIES under the other convention, to show what the switch changes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
EXPERTS = ("math", "code", "chat")
WEIGHTS = {"math": 0.5, "code": 0.3, "chat": 0.8}
SEED = 5
# name -> (mergekit merge_method, its global parameters, its per-model parameters, adamerge pool.preprocess)
MERGEKIT_METHODS = {
    "task_arithmetic": ("task_arithmetic", {}, {}, {"method": "none"}),
    "ties": ("ties", {}, {"density": 0.2}, {"method": "ties", "density": 0.2, "disjoint_mean": True}),
    "ties normalize=false": ("ties", {"normalize": False}, {"density": 0.2}, {"method": "ties", "density": 0.2}),
    "dare_linear": ("dare_linear", {}, {"density": 0.3}, {"method": "dare_linear", "p": 0.7}),
    "dare_ties": ("dare_ties", {}, {"density": 0.4}, {"method": "dare_ties", "p": 0.6}),
    "breadcrumbs": ("breadcrumbs", {}, {"density": 0.8, "gamma": 0.05},
                    {"method": "breadcrumbs", "density": 0.8, "gamma": 0.05}),
    "breadcrumbs_ties": ("breadcrumbs_ties", {}, {"density": 0.5, "gamma": 0.02},
                         {"method": "breadcrumbs_ties", "density": 0.5, "gamma": 0.02}),
    "della": ("della", {}, {"density": 0.4, "epsilon": 0.15},
              {"method": "della", "density": 0.4, "epsilon": 0.15, "disjoint_mean": True}),
    "della_linear": ("della_linear", {}, {"density": 0.4, "epsilon": 0.15},
                     {"method": "della_linear", "density": 0.4, "epsilon": 0.15}),
}
TIES_PAPER = {"method": "ties", "density": 0.2, "disjoint_mean": True}  # FusionBench threshold 20, mean


def digest(t: torch.Tensor) -> str:
    """Names an expert's delta by its bytes, on both sides."""
    return hashlib.sha1(t.detach().contiguous().float().numpy().tobytes()).hexdigest()


# ---- the peers' side (their own interpreters: torch, safetensors and the peer only) ------------------


def run_mergekit(job: dict) -> dict:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.merge_methods import generalized_task_arithmetic as gta
    from mergekit.options import MergeOptions
    from safetensors.torch import load_file

    masks = load_file(job["masks"]) if job.get("masks") else {}
    seen: dict[str, torch.Tensor] = {}
    original_sparsify = gta.sparsify

    def sparsify_with_adamerge_masks(tensor, density, method, **kwargs):
        seen["key"] = digest(tensor)
        return original_sparsify(tensor, density=density, method=method, **kwargs)

    def bernoulli(probs, *args, **kwargs):
        key = seen["key"]
        if f"p:{key}" in masks:
            seen["p_keep diff"] = max(seen.get("p_keep diff", 0.0),
                                      (probs.reshape(-1) - masks[f"p:{key}"].reshape(-1)).abs().max().item())
        return masks[f"m:{key}"].to(probs.dtype).view_as(probs)

    gta.sparsify, torch.bernoulli = sparsify_with_adamerge_masks, bernoulli
    models = [{"model": job["dirs"][e], "parameters": {"weight": WEIGHTS[e], **job["per_model"]}} for e in EXPERTS]
    config = {"merge_method": job["method"], "base_model": job["dirs"]["base"], "models": models,
              "parameters": job["parameters"], "dtype": "float32"}
    run_merge(MergeConfiguration.model_validate(config), job["out"],
              options=MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True))
    return {"p_keep diff": seen.get("p_keep diff")}


def run_fusionbench(job: dict) -> dict:
    from fusion_bench.method.ties_merging.ties_merging_utils import ties_merging
    from safetensors.torch import load_file, save_file

    base = load_file(job["base"])
    experts = [load_file(job["experts"][e]) for e in EXPERTS]
    names = list(base)  # adamerge's parameter order; the threshold does not depend on it
    flat = torch.stack([torch.cat([(x[n] - base[n]).flatten() for n in names]) for x in experts])
    merged = torch.cat([base[n].flatten() for n in names]) + ties_merging(flat, reset_thresh=20, merge_func="mean")
    pieces = merged.split([base[n].numel() for n in names])
    save_file({n: p.view_as(base[n]).contiguous() for n, p in zip(names, pieces, strict=True)}, job["out"])
    if job.get("llama_dirs"):  # the whole algorithm on the Llama family (no tied weights to count twice)
        from fusion_bench.method import TiesMergingAlgorithm
        from transformers import AutoModelForCausalLM

        dirs = job["llama_dirs"]
        pool = {"_pretrained_": AutoModelForCausalLM.from_pretrained(dirs["base"], dtype=torch.float32)}
        pool.update({e: AutoModelForCausalLM.from_pretrained(dirs[e], dtype=torch.float32) for e in EXPERTS})
        model = TiesMergingAlgorithm(scaling_factor=1.0, threshold=20, remove_keys=[], merge_func="mean").run(pool)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, job["out_algorithm"])
    return {}


# ---- adamerge's side ---------------------------------------------------------------------------------


def tiny_families() -> dict:
    sys.path.insert(0, str(HERE.parent / "tests"))
    from conftest import gpt2, llama, perturb

    return {"llama": (llama(), perturb), "gpt2": (gpt2(), perturb)}


def save_family(root: Path, base, perturb) -> dict[str, str]:
    dirs = {"base": str(root / "base")}
    base.save_pretrained(dirs["base"])
    for k, e in enumerate(EXPERTS):
        dirs[e] = str(root / e)
        perturb(base, seed=k).save_pretrained(dirs[e])
    return dirs


def adamerge_merge(dirs: dict[str, str], preprocess: dict, weights) -> dict[str, torch.Tensor]:
    from adamerge import ExpertPool
    from adamerge.granularity import Task
    from adamerge.loading import apply_preprocess
    from adamerge.merged import MergedModel

    pool = ExpertPool(dirs["base"], {e: dirs[e] for e in EXPERTS}, auto_class="AutoModelForCausalLM")
    tv = apply_preprocess(pool.task_vectors(), {**preprocess, "weights": weights}, seed=SEED)
    return {k: v.detach() for k, v in MergedModel(pool.base, tv, Task(init=weights)).fold().state_dict().items()}


def adamerge_masks(dirs: dict[str, str], preprocess: dict, path: Path) -> None:
    """The masks (and DELLA keep probabilities) adamerge draws, keyed by each expert delta's bytes."""
    from safetensors.torch import save_file

    from adamerge import ExpertPool
    from adamerge.taskvectors import row_ranks, uniform_draw

    tv = ExpertPool(dirs["base"], {e: dirs[e] for e in EXPERTS}, auto_class="AutoModelForCausalLM").task_vectors()
    generator, out = torch.Generator().manual_seed(SEED), {}
    for stack in tv.stacks.values():
        u = uniform_draw(stack, generator)
        if preprocess["method"].startswith("dare"):
            keep, p_keep = u >= preprocess["p"], None
        else:
            eps = preprocess["epsilon"]
            p_keep = (preprocess["density"] - eps) + row_ranks(stack) * 2 * eps
            keep = u < p_keep
        for k in range(stack.shape[0]):
            out[f"m:{digest(stack[k])}"] = keep[k].contiguous()
            if p_keep is not None:
                out[f"p:{digest(stack[k])}"] = p_keep[k].contiguous()
    save_file(out, str(path))


def peer(python: Path, kind: str, job: dict, root: Path) -> dict:
    spec = root / f"job-{kind}-{abs(hash(json.dumps(job, sort_keys=True)))}.json"
    spec.write_text(json.dumps(job))
    done = subprocess.run([str(python), __file__, "--peer", kind, str(spec)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"{kind} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def load_merged(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = [out] if out.is_file() else sorted(out.glob("*.safetensors"))
    return {k: v for f in files for k, v in load_file(str(f)).items()}


def max_diff(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> tuple[float, int, list[str]]:
    common = [k for k in theirs if k in ours]
    diff = max((ours[k] - theirs[k]).abs().max().item() for k in common)
    return diff, len(common), sorted(set(theirs) ^ set(ours))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mergekit", type=Path, default=HERE / ".venv-mergekit" / "bin" / "python")
    parser.add_argument("--fusionbench", type=Path, default=HERE / ".venv-fusionbench" / "bin" / "python")
    parser.add_argument("--peer", help=argparse.SUPPRESS)
    parser.add_argument("job", nargs="?", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peer:
        torch.set_num_threads(1)
        job = json.loads(Path(args.job).read_text())
        print(json.dumps((run_mergekit if args.peer == "mergekit" else run_fusionbench)(job)))
        return

    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for family, (base, perturb) in tiny_families().items():
            dirs = save_family(root / family, base, perturb)
            if args.mergekit.exists():
                for name, (method, parameters, per_model, preprocess) in MERGEKIT_METHODS.items():
                    cfg = {**preprocess, "convention": "mergekit"}
                    job = {"dirs": dirs, "method": method, "parameters": parameters, "per_model": per_model,
                           "out": str(root / f"{family}-{method}-{len(rows)}")}
                    if method.startswith(("dare", "della")):
                        job["masks"] = str(root / f"masks-{family}-{len(rows)}.safetensors")
                        adamerge_masks(dirs, cfg, Path(job["masks"]))
                    extra = peer(args.mergekit, "mergekit", job, root)
                    theirs = load_merged(Path(job["out"]))
                    diff, n, odd = max_diff(adamerge_merge(dirs, cfg, dict(WEIGHTS)), theirs)
                    rows.append(("mergekit", family, name, "mergekit", diff, n, odd, extra.get("p_keep diff")))
                    if name == "ties":  # the control: the same merge under the paper's convention
                        diff, n, odd = max_diff(adamerge_merge(dirs, {**cfg, "convention": "paper"}, dict(WEIGHTS)),
                                                theirs)
                        rows.append(("mergekit", family, name, "paper (control)", diff, n, odd, None))
            else:
                rows.append(("mergekit", family, "-", "-", None, 0, [f"skipped: no {args.mergekit}"], None))
            if args.fusionbench.exists():
                ours = adamerge_merge(dirs, TIES_PAPER, 1.0)
                params = {n: p.detach().contiguous() for n, p in base.named_parameters()}
                from safetensors.torch import save_file

                files = {"base": root / f"{family}-params-base.safetensors"}
                save_file(params, str(files["base"]))
                experts = {}
                for k, e in enumerate(EXPERTS):
                    experts[e] = str(root / f"{family}-params-{e}.safetensors")
                    save_file({n: p.detach().contiguous() for n, p in perturb(base, seed=k).named_parameters()},
                              experts[e])
                job = {"base": str(files["base"]), "experts": experts, "out": str(root / f"{family}-fb.safetensors")}
                if family == "llama":
                    job.update(llama_dirs=dirs, out_algorithm=str(root / "llama-fb-algorithm.safetensors"))
                peer(args.fusionbench, "fusionbench", job, root)
                diff, n, odd = max_diff(ours, load_merged(Path(job["out"])))
                rows.append(("FusionBench ties_merging", family, "ties", "paper", diff, n, odd, None))
                if family == "llama":
                    diff, n, odd = max_diff(ours, load_merged(Path(job["out_algorithm"])))
                    rows.append(("FusionBench TiesMergingAlgorithm", family, "ties", "paper", diff, n, odd, None))
            else:
                rows.append(("FusionBench", family, "-", "-", None, 0, [f"skipped: no {args.fusionbench}"], None))

    print("| peer | family | method | adamerge convention | max abs diff | tensors | keys only on one side | "
          "p_keep diff |")
    print("|---|---|---|---|---|---|---|---|")
    for peer_name, family, name, convention, diff, n, odd, pdiff in rows:
        d = "" if diff is None else f"{diff:.2e}"
        p = "" if pdiff is None else f"{pdiff:.2e}"
        print(f"| {peer_name} | {family} | {name} | {convention} | {d} | {n} | {', '.join(odd)} | {p} |")


if __name__ == "__main__":
    main()
