"""Model kinship: how alike the experts' task vectors are, per pair of experts, overall and per layer.

Two numbers per pair, over the whole model and per layer (the tensors of one block ``....N``; other
tensors each on their own): the cosine similarity of the two task vectors (model kinship, arXiv
2410.20186, compares fine-tunes by the similarity of their delta parameters) and their sign
agreement, the fraction of the entries both experts change whose signs agree (what TIES' sign
election, arXiv 2306.01708, resolves). A cosine near or below 0 and a sign agreement near or below
50% mark experts that interfere when merged; the layers where a pair conflicts most are listed.

``python -m adamerge inspect pool.base=DIR pool.experts.NAME=DIR ...`` prints the table before any
merge: tensor by tensor from the checkpoints' safetensors files when every model is a local
directory of them (one base tensor and one tensor per expert in memory at a time), else through the
expert pool (one expert loaded at a time). The model card of a merge carries the same table.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adamerge.errors import AdamergeError
from adamerge.safetensors_io import LazyTensors, read_layout, weight_files

LAYER = re.compile(r"^(.*?\.\d+)\.")
SHOWN_LAYERS = 3
SIGN_CHUNK = 1 << 14  # columns per sign GEMM: exact fp32 counts; temporaries small enough to be reused


@dataclass
class PairStats:
    """Sums over the tensors seen so far for one pair of experts (a, b)."""

    dot: float = 0.0
    sq_a: float = 0.0
    sq_b: float = 0.0
    agree: int = 0  # entries both change with the same sign
    both: int = 0  # entries both change

    def add(self, other: PairStats) -> None:
        self.dot += other.dot
        self.sq_a += other.sq_a
        self.sq_b += other.sq_b
        self.agree += other.agree
        self.both += other.both

    @property
    def cosine(self) -> float:
        norm = (self.sq_a * self.sq_b) ** 0.5
        return self.dot / norm if norm > 0 else 0.0

    @property
    def sign_agreement(self) -> float:
        return self.agree / self.both if self.both else float("nan")

    def cells(self) -> str:
        """``cosine, sign agreement`` for a table (n/a where no entry is changed by both)."""
        agreement = f"{self.sign_agreement:.1%}" if self.both else "n/a"
        return f"{self.cosine:.3f}, {agreement}"


@dataclass
class Kinship:
    experts: list[str]
    overall: dict[tuple[int, int], PairStats] = field(default_factory=dict)
    layers: dict[str, dict[tuple[int, int], PairStats]] = field(default_factory=dict)

    @property
    def pairs(self) -> list[tuple[int, int]]:
        k = len(self.experts)
        return [(i, j) for i in range(k) for j in range(i + 1, k)]


def layer_of(name: str) -> str:
    """``model.layers.3.mlp.up_proj.weight`` -> ``model.layers.3``; a tensor outside the blocks is its own layer."""
    match = LAYER.match(name)
    return match.group(1) if match else name


def tensor_stats(stack: torch.Tensor) -> dict[tuple[int, int], PairStats]:
    """Every pair's dot product, squared norms and sign counts on one ``(K, *shape)`` stack (fp32 sums).

    Sign counts for all pairs at once, by two small GEMMs per column chunk: with s = sign(tau), ``s @ s.T``
    is agreements minus disagreements and ``|s| @ |s|.T`` the entries both change (exact: integers below
    2^24 per chunk), so agreements = (both + signed) / 2; a loop over pairs read the stack K^2 / 2 times."""
    flat = stack.flatten(1)
    wide = flat.float()
    gram = wide @ wide.T
    k = flat.shape[0]
    signed, both = torch.zeros(k, k, dtype=torch.float64), torch.zeros(k, k, dtype=torch.float64)
    for chunk in wide.split(SIGN_CHUNK, dim=1):
        s = torch.sign(chunk)
        z = s.abs()
        signed += s @ s.T
        both += z @ z.T
    agree = (both + signed) / 2
    return {(i, j): PairStats(gram[i, j].item(), gram[i, i].item(), gram[j, j].item(), int(agree[i, j]),
                              int(both[i, j])) for i in range(k) for j in range(i + 1, k)}


def kinship(experts: Sequence[str], stacks: Iterable[tuple[str, torch.Tensor]]) -> Kinship:
    """Accumulate the pair statistics over ``(name, (K, *shape) stack)`` pairs, one tensor at a time."""
    result = Kinship(list(experts))
    result.overall = {pair: PairStats() for pair in result.pairs}
    for name, stack in stacks:
        if stack.shape[0] != len(experts):
            raise AdamergeError(f"{name}: a stack of {stack.shape[0]} task vectors for {len(experts)} experts")
        layer = result.layers.setdefault(layer_of(name), {pair: PairStats() for pair in result.pairs})
        for pair, stats in tensor_stats(stack).items():
            result.overall[pair].add(stats)
            layer[pair].add(stats)
    return result


def markdown(result: Kinship, shown: int = SHOWN_LAYERS) -> list[str]:
    """One row per pair: overall cosine and sign agreement, and the layers with the lowest cosine."""
    if not result.pairs:
        return []
    lines = ["| experts | cosine, sign agreement | most conflicting layers (cosine, sign agreement) |",
             "|---|---|---|"]
    for pair in result.pairs:
        changed = [layer for layer in result.layers if result.layers[layer][pair].both]  # both experts change it
        worst = sorted(changed, key=lambda layer: result.layers[layer][pair].cosine)[:shown]
        cells = ", ".join(f"`{layer}` ({result.layers[layer][pair].cells()})" for layer in worst)
        a, b = (result.experts[i] for i in pair)
        lines.append(f"| {a} / {b} | {result.overall[pair].cells()} | {cells} |")
    return lines


CARD_ENTRIES = 1 << 16  # entries per tensor the model card's table reads (``inspect`` reads them all)


def evenly_spaced(stack: torch.Tensor, most: int) -> torch.Tensor:
    """At most ``most`` evenly spaced entries of each expert's flattened task vector (a strided view)."""
    flat = stack.flatten(1)
    return flat[:, :: -(-flat.shape[1] // most)]


def merged_kinship(merged, entries: int = CARD_ENTRIES) -> list[str]:
    """The table for a merge (the model card): the task vectors as merged, i.e. after ``pool.preprocess``, on
    at most ``entries`` evenly spaced entries per tensor: every entry of every pair cost a static merge of a
    127M Llama more CPU time than merging it (BENCHMARKS.md); the sample's cosines are estimates."""
    with torch.no_grad():
        return markdown(kinship(merged.experts, ((n, evenly_spaced(merged.stack(n), entries)) for n in merged.names)))


# ---- python -m adamerge inspect --------------------------------------------------------------------------


def selected(name: str, include: Sequence[str], exclude: Sequence[str]) -> bool:
    """``pool.include`` / ``pool.exclude`` as the pool applies them (regex search)."""
    return (not include or any(re.search(rx, name) for rx in include)) and not any(
        re.search(rx, name) for rx in exclude)


def streamed_stacks(base: LazyTensors, experts: Sequence[LazyTensors], include: Sequence[str] = (),
                    exclude: Sequence[str] = ()) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, stack)`` for every floating tensor the base and every expert hold with the same shape."""
    for name in base:
        if not selected(name, include, exclude) or any(name not in e for e in experts):
            continue
        if any(e.shape(name) != base.shape(name) for e in experts):
            continue
        w0 = base[name]
        if not w0.is_floating_point():
            continue
        yield name, torch.stack([e[name].to(w0.dtype) - w0 for e in experts])


def stacks_of(pool_cfg: Mapping) -> tuple[list[str], Iterable[tuple[str, torch.Tensor]]]:
    """The experts and their task-vector stacks: streamed from safetensors where every model is a local
    directory holding them, else from the expert pool (which reads any source adamerge reads)."""
    experts = {k: str(v) for k, v in (pool_cfg.get("experts") or {}).items()}
    if not pool_cfg.get("base") or len(experts) < 2:
        raise AdamergeError("inspect needs pool.base=DIR_OR_ID and at least two pool.experts.NAME=DIR_OR_ID")
    roles = {"base": Path(pool_cfg["base"]), **{f"expert {n!r}": Path(p) for n, p in experts.items()}}
    if all(path.is_dir() and weight_files(path) for path in roles.values()):
        base, *rest = (LazyTensors(read_layout(path, role)) for role, path in roles.items())
        return list(experts), streamed_stacks(base, rest, pool_cfg.get("include") or (), pool_cfg.get("exclude") or ())
    from adamerge.loading import build_pool, raw_task_vectors

    tv = raw_task_vectors(build_pool(pool_cfg), pool_cfg)
    return tv.experts, ((n, tv.factors[n].dense() if n in tv.factors else tv.stacks[n]) for n in tv.names)


def compose_pool(overrides: Sequence[str]) -> dict:
    """``pool`` of the config these command-line overrides make (the same syntax as a merge run)."""
    from hydra.errors import HydraException
    from omegaconf import OmegaConf

    from adamerge.overrides import compose_overrides

    try:
        cfg = compose_overrides(overrides)
    except HydraException as e:
        raise AdamergeError(str(e).splitlines()[0]) from e
    return OmegaConf.to_container(cfg.pool, resolve=True)


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m adamerge inspect",
        description="Kinship of the experts' task vectors (cosine similarity and sign agreement per pair, "
                    "overall and per layer) before merging.")
    parser.add_argument("overrides", nargs="*", help="pool.base=DIR_OR_ID pool.experts.NAME=DIR_OR_ID ...")
    parser.add_argument("--layers", type=int, default=SHOWN_LAYERS, help="conflicting layers shown per pair")
    args = parser.parse_args(list(argv))
    try:
        experts, stacks = stacks_of(compose_pool(args.overrides))
        result = kinship(experts, stacks)
    except AdamergeError as e:
        print(f"adamerge: error: {e}", file=sys.stderr)
        return 2
    print(f"Kinship of {len(experts)} experts' task vectors over {len(result.layers)} layers "
          "(cosine similarity; sign agreement over the entries both change):\n")
    print("\n".join(markdown(result, args.layers)))
    return 0
