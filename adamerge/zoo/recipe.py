"""The zoo's recipe: train a tiny base, four experts and four LoRA adapters, then measure them.

It follows docs/ARCHITECTURE.md ("The offline zoo: making merging mean something"):

1. pretrain the base broadly: generic tasks plus the four expert tasks, where each expert task's
   marker is used for its decoy convention in ``decoy_rate`` of the rows (see ``tasks.py``), so the
   base has every skill but is clearly worse than the experts;
2. fine-tune one expert per task gently (low lr, few steps, half of each batch replayed from the
   pretraining mix, as instruction tuning does), which keeps ||tau_k|| / ||W0|| small;
3. train the same experts as LoRA adapters on the base;
4. measure the quality bars (``quality.py``); they become the zoo's report.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from adamerge.errors import AdamergeError
from adamerge.evaluate import evaluate_tasks, exact_match, load_jsonl
from adamerge.zoo.quality import (
    StateDict,
    format_report,
    normalized_or_nan,
    quality_checks,
    search_lambdas,
    task_arithmetic,
    tau_ratio,
)
from adamerge.zoo.tasks import EXPERT_TASKS, GENERIC_TASKS, make_splits, with_decoys, write_eval_splits
from adamerge.zoo.tokenizer import char_tokenizer
from adamerge.zoo.train import clone_state, encode_rows, save_quietly, train_lm

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MAX_NEW_TOKENS = 8  # answers are at most 6 characters plus eos
ADAPTER_BASE = "../../base"


@dataclass(frozen=True)
class ZooSettings:
    """Everything a build depends on; the defaults are the embedded zoo, tuned to pass its quality bars."""

    seed: int = 0
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 256
    n_train: int = 2000
    """Training rows per expert task (generic tasks get half)."""
    n_calib: int = 128
    n_test: int = 500
    decoy_rate: float = 0.6
    """Share of an expert task's pretraining rows answered with its decoy convention."""
    base_steps: int = 1000
    base_lr: float = 3e-3
    batch_size: int = 128
    expert_steps: int = 80
    expert_lr: float = 2e-4
    expert_batch_size: int = 64
    replay: float = 0.5
    """Share of an expert's fine-tuning rows drawn from the base's pretraining mix."""
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_steps: int = 100
    lora_lr: float = 2e-3
    ta_lambda: float = 0.3
    lambda_grid: tuple[float, ...] = (0.3, 0.5, 0.7, 0.9, 1.1)

    def as_json(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))


def _new_model(settings: ZooSettings, tokenizer) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=settings.hidden_size,
        intermediate_size=settings.intermediate_size,
        num_hidden_layers=settings.num_layers,
        num_attention_heads=settings.num_heads,
        num_key_value_heads=settings.num_heads,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config)


def train_zoo(out: Path, s: ZooSettings, say: Callable[[str], None] = print) -> dict:
    """Train and save everything under ``out``; returns the report.

    An adapter's config names its base as ``../../base`` (relative to the adapter directory), so a
    zoo stays valid wherever it is moved or cloned; adamerge always loads adapters on the pool's base.
    """
    start = time.perf_counter()
    tokenizer = char_tokenizer()
    splits = {
        name: make_splits(task, {"calib": s.n_calib, "train": s.n_train, "test": s.n_test}, s.seed)
        for name, task in EXPERT_TASKS.items()
    }
    write_eval_splits(out / "data", s.seed, s.n_calib, s.n_test, s.n_train)
    test = {t: load_jsonl(out / "data" / t / "test.jsonl") for t in EXPERT_TASKS}
    calib = {t: sp["calib"] for t, sp in splits.items()}  # labeled here: only the grid search reads labels
    mix = _pretraining_mix(splits, s)

    torch.manual_seed(s.seed)
    base = _new_model(s, tokenizer)
    loss = train_lm(base, encode_rows(tokenizer, mix), s.base_steps, s.base_lr, s.batch_size, s.seed)
    say(f"base: {s.base_steps} steps on {len(mix)} rows, final loss {loss:.3f} ({time.perf_counter() - start:.0f}s)")
    save_quietly(base, tokenizer, out / "base")
    base_sd = clone_state(base.state_dict())

    expert_sds: dict[str, StateDict] = {}
    report: dict = {"expert": {}, "lora": {}, "tau_ratio": {}}
    for i, (name, rows) in enumerate(_expert_data(splits, mix, s).items()):
        data = encode_rows(tokenizer, rows)
        expert = copy.deepcopy(base)
        train_lm(expert, data, s.expert_steps, s.expert_lr, s.expert_batch_size, s.seed + 1 + i)
        save_quietly(expert, tokenizer, out / "experts" / name)
        expert_sds[name] = clone_state(expert.state_dict())
        report["expert"][name] = exact_match(expert, tokenizer, test[name], MAX_NEW_TOKENS)
        report["tau_ratio"][name] = tau_ratio(base_sd, expert_sds[name])

        lora = get_peft_model(copy.deepcopy(base), _lora_config(s))
        train_lm(lora, data, s.lora_steps, s.lora_lr, s.expert_batch_size, s.seed + 1 + i)
        lora.peft_config["default"].base_model_name_or_path = str(out / "base")  # read by peft while saving
        lora.save_pretrained(out / "lora" / name)
        _point_at_base(out / "lora" / name)
        report["lora"][name] = exact_match(lora, tokenizer, test[name], MAX_NEW_TOKENS)
        say(
            f"expert {name}: EM {report['expert'][name]:.2f}, ||tau||/||W0|| {report['tau_ratio'][name]:.4f}; "
            f"LoRA EM {report['lora'][name]:.2f} ({time.perf_counter() - start:.0f}s)"
        )

    report.update(_merge_quality(base, base_sd, expert_sds, tokenizer, calib, test, report["expert"], s))
    report["checks"] = quality_checks(report)
    report["seconds"] = round(time.perf_counter() - start, 1)
    say(format_report(report))
    say(f"zoo built in {report['seconds']:.0f}s")
    return report


def _point_at_base(adapter_dir: Path) -> None:
    """Name the base in the adapter's config by its path relative to the adapter (``ADAPTER_BASE``), and
    sort its target modules (peft writes a set, whose order changes from process to process)."""
    path = adapter_dir / "adapter_config.json"
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = ADAPTER_BASE
    config["target_modules"] = sorted(config["target_modules"])
    path.write_text(json.dumps(config, indent=2, sort_keys=True))


def _pretraining_mix(splits: dict, s: ZooSettings) -> list[dict]:
    """The base's rows: expert tasks with a ``decoy_rate`` share of decoy answers, plus generic tasks."""
    mix = []
    for name, task in EXPERT_TASKS.items():
        mix += with_decoys(task, splits[name]["train"], s.decoy_rate, s.seed)
    for task in GENERIC_TASKS.values():
        mix += make_splits(task, {"train": s.n_train // 2}, s.seed)["train"]
    return mix


def _expert_data(splits: dict, mix: list[dict], s: ZooSettings) -> dict[str, list[dict]]:
    """Each expert's fine-tuning rows: its task's clean train split plus a ``replay`` share of the mix."""
    if not 0 <= s.replay < 1:
        raise AdamergeError(f"zoo setting replay must be in [0, 1), got {s.replay}")
    data = {}
    for name in EXPERT_TASKS:
        own = splits[name]["train"]
        k = round(len(own) * s.replay / (1 - s.replay))
        data[name] = own + random.Random(f"adamerge-zoo/replay/{name}/{s.seed}").sample(mix, k)
    return data


def _merge_quality(base, base_sd, expert_sds, tokenizer, calib, test, expert_em, s: ZooSettings) -> dict:
    """Task arithmetic at ``ta_lambda`` and the best per-expert lambdas of a small grid (picked on calib)."""
    scratch = copy.deepcopy(base)

    def scores(lambdas: dict[str, float], data: dict) -> dict[str, float]:
        scratch.load_state_dict(task_arithmetic(base_sd, expert_sds, lambdas))
        return evaluate_tasks(scratch, tokenizer, data, MAX_NEW_TOKENS)

    ta = scores(dict.fromkeys(expert_sds, s.ta_lambda), test)
    best, _ = search_lambdas(lambda lam: scores(lam, calib)["avg"], list(expert_sds), s.lambda_grid)
    grid = scores(best, test)
    return {
        "base": evaluate_tasks(base, tokenizer, test, MAX_NEW_TOKENS),
        "task_arithmetic": {"lambda": s.ta_lambda, "em": ta, "normalized": normalized_or_nan(ta, expert_em)},
        "best_grid": {"lambdas": best, "em": grid, "normalized": normalized_or_nan(grid, expert_em)},
    }


def _lora_config(s: ZooSettings) -> LoraConfig:
    return LoraConfig(
        r=s.lora_rank, lora_alpha=s.lora_alpha, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM"
    )
