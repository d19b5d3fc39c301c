"""A tiny zoo for the training tests: char tokenizer, random Llama base, seeded experts, JSONL data.

Everything is built in-process (nothing is downloaded). ``build_module`` makes the Python-API
objects (MergedModel, TaskDataModule, MergeModule) from config-style dicts; ``write_zoo`` saves the
same zoo to disk for the CLI. Run as a script, this file is ``adamerge.run.run`` with a composed
config, and can stop (sleep) before a given step so that a test can SIGKILL it there::

    python tests/tiny.py [--pause-at STEP] RUN_DIR OVERRIDE...
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from adamerge.data import Collator  # noqa: E402
from adamerge.datamodule import TaskDataModule  # noqa: E402
from adamerge.granularity import GRANULARITIES  # noqa: E402
from adamerge.merged import MergedModel  # noqa: E402
from adamerge.objectives import OBJECTIVES  # noqa: E402
from adamerge.pool import ExpertPool  # noqa: E402
from adamerge.training import MergeModule  # noqa: E402
from adamerge.zoo.tokenizer import char_tokenizer  # noqa: E402

TASKS = ("add", "rev")
ROWS = 8  # calibration rows per task


def tiny_llama(seed: int = 0) -> nn.Module:
    """A 2-layer Llama over the char tokenizer's vocabulary; initializer_range=0.1 so that its
    predictions are peaky rather than uniform (entropy has something to minimize)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = char_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, initializer_range=0.1,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


@torch.no_grad()
def tiny_expert(base: nn.Module, k: int, scale: float = 0.05) -> nn.Module:
    """Expert k = the base with every parameter moved by seeded Gaussian noise."""
    out = copy.deepcopy(base)
    gen = torch.Generator().manual_seed(100 + k)
    for p in out.parameters():
        p.add_(scale * torch.randn(p.shape, generator=gen))
    return out.eval()


def task_rows(task: str, n: int = ROWS) -> list[dict]:
    """``n`` deterministic prompt/answer rows of varying length (so batches really are left-padded)."""
    rng = random.Random(task)
    rows = []
    for _ in range(n):
        if task == "add":
            a, b = rng.randint(0, 999), rng.randint(0, 99)
            prompt, answer = f"add {a}+{b}=", str(a + b)
        else:
            word = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(2, 7)))
            prompt, answer = f"{task} {word}=", word[::-1]
        rows.append({"prompt": prompt, "answer": answer})
    return rows


@dataclass
class Zoo:
    """An on-disk zoo: base (with tokenizer), one expert per task, calibration JSONL per task."""

    root: Path
    base: Path
    experts: dict[str, Path]
    data: dict[str, Path]

    def cli_args(self) -> list[str]:
        """The bring-your-own-models overrides of ``python -m adamerge`` for this zoo."""
        args = [f"pool.base={self.base}"]
        args += [f"pool.experts.{name}={path}" for name, path in self.experts.items()]
        args += [f"data.paths.{name}={path}" for name, path in self.data.items()]
        return args


def write_zoo(root: Path, tasks: Sequence[str] = TASKS, rows: int = ROWS) -> Zoo:
    """Save base + experts with ``save_pretrained`` and the char tokenizer beside the base."""
    root.mkdir(parents=True, exist_ok=True)
    base = tiny_llama()
    base.save_pretrained(root / "base")
    char_tokenizer().save_pretrained(root / "base")
    experts, data = {}, {}
    for k, task in enumerate(tasks):
        experts[task] = root / task
        tiny_expert(base, k).save_pretrained(experts[task])
        data[task] = root / f"{task}.jsonl"
        data[task].write_text("".join(json.dumps(r) + "\n" for r in task_rows(task, rows)))
    return Zoo(root, root / "base", experts, data)


# ---- Python API -----------------------------------------------------------------------------------


@dataclass
class Parts:
    """One pool's frozen pieces, shared read-only by many MergedModels."""

    pool: ExpertPool
    task_vectors: object
    tokenizer: object
    rows: dict[str, list[dict]]


def tiny_parts(tasks: Sequence[str] = TASKS, rows: int = ROWS) -> Parts:
    base = tiny_llama()
    pool = ExpertPool(base, {t: (lambda k=k: tiny_expert(base, k)) for k, t in enumerate(tasks)})
    return Parts(pool, pool.task_vectors(), char_tokenizer(), {t: task_rows(t, rows) for t in tasks})


def build_module(parts: Parts, granularity: Mapping, objective: Mapping, optim: Mapping | None = None,
                 batch_size: int = ROWS, shuffle: bool = False, seed: int = 0, shard: bool = False):
    """(MergedModel, TaskDataModule, MergeModule) from config-style dicts (``name`` + options);
    the objective is set up (teachers cached) as ``run`` does. ``shard``: ``pool.shard=true``."""
    g, o = dict(granularity), dict(objective)
    gran = GRANULARITIES[g.pop("name")](**g)
    obj = OBJECTIVES[o.pop("name")](**o)
    merged = MergedModel(parts.pool.base, parts.task_vectors, gran, shard=shard)
    collator = Collator(parts.tokenizer, answer_field="answer" if getattr(obj, "needs_labels", False) else None)
    data = TaskDataModule(parts.rows, collator, batch_size=batch_size, shuffle=shuffle, seed=seed)
    obj.setup(merged, data, parts.tokenizer)
    module = MergeModule(merged, obj, {"name": "adam", "lr": 0.05, **(optim or {})})
    return merged, data, module


def quiet_trainer(max_steps: int, **kwargs) -> pl.Trainer:
    options = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1)
    return pl.Trainer(max_steps=max_steps, **{**options, **kwargs})


# ---- the script: adamerge.run.run, optionally paused before a step ---------------------------------


class PauseAt(pl.Callback):
    """Before step ``step`` runs (the checkpoint of the step before is complete), write ``marker``
    and sleep, so that the test can kill the process there."""

    def __init__(self, step: int, marker: Path) -> None:
        self.step, self.marker = step, marker

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            self.marker.write_text(str(trainer.global_step))
            time.sleep(600)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="adamerge.run.run on a composed config")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--pause-at", type=int, default=None, help="sleep before this step (marker: RUN_DIR/paused)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)

    from hydra import compose, initialize_config_module

    import adamerge.run
    import adamerge.training
    from adamerge.overrides import open_mapping_overrides

    with initialize_config_module("adamerge.conf", version_base=None):
        cfg = compose("config", overrides=open_mapping_overrides(args.overrides))
    if args.pause_at is not None:
        callbacks = adamerge.training.checkpoint_callbacks
        pause = PauseAt(args.pause_at, args.run_dir / "paused")
        adamerge.training.checkpoint_callbacks = lambda run_dir, every: [*callbacks(run_dir, every), pause]
    args.run_dir.mkdir(parents=True, exist_ok=True)
    adamerge.run.run(cfg, args.run_dir)


if __name__ == "__main__":
    main()


def assert_refold_writes_the_same(out: Path, again: Path) -> None:
    """``adamerge fold`` of the run written to ``out`` (its saved coefficients and own tensors) into ``again``
    writes ``out``'s weights (to fp32 rounding)."""
    from safetensors.torch import load_file

    from adamerge.fold import refold

    refold(out, again)
    first, second = (load_file(d / "model.safetensors") for d in (out, again))
    for name, value in first.items():
        torch.testing.assert_close(second[name], value, rtol=0, atol=1e-6)
