"""Per-task metrics for any model: a plain Hugging Face model or a wrapper such as ``MergedModel``.

A model here is any ``nn.Module`` whose ``__call__(input_ids=..., attention_mask=..., position_ids=...)``
returns an object with ``.logits``. Wrappers are not ``GenerationMixin``s, so generation is our own
short greedy loop (left padding, explicit position ids, no KV cache: answers are a few tokens long).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader

from adamerge.data import Collator, Examples, left_pad, load_jsonl, model_inputs  # noqa: F401  (load_jsonl re-exported)
from adamerge.errors import AdamergeError
from adamerge.generation import greedy_continuations
from adamerge.granularity import Task
from adamerge.harness import HarnessOptions, reference_scores
from adamerge.loading import load_test_sets, prepare_task_vectors, raw_task_vectors
from adamerge.merged import MergedModel
from adamerge.pool import ExpertPool
from adamerge.taskvectors import TaskVectors


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise AdamergeError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")
    return pad


def _greedy_batch(model: nn.Module, tokenizer, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
    device = _device(model)
    ids, mask = left_pad([torch.tensor(tokenizer(p)["input_ids"]) for p in prompts], _pad_id(tokenizer))
    eos = tokenizer.eos_token_id
    generated = greedy_continuations(model, ids.to(device), mask.to(device), max_new_tokens, eos)
    return [tokenizer.decode(_until(seq.tolist(), eos), skip_special_tokens=True) for seq in generated]


def _until(seq: list[int], eos: int | None) -> list[int]:
    return seq[: seq.index(eos)] if eos is not None and eos in seq else seq


@torch.no_grad()
def greedy_generate(
    model: nn.Module, tokenizer, prompts: Sequence[str], max_new_tokens: int = 16, batch_size: int = 128
) -> list[str]:
    """Greedy continuation of each prompt (without the prompt), cut at the first eos."""
    was_training = model.training
    model.eval()
    try:
        outputs: list[str] = []
        for start in range(0, len(prompts), batch_size):
            outputs += _greedy_batch(model, tokenizer, prompts[start : start + batch_size], max_new_tokens)
        return outputs
    finally:
        model.train(was_training)


def exact_match(
    model: nn.Module, tokenizer, examples: Sequence[dict], max_new_tokens: int = 16, batch_size: int = 128
) -> float:
    """Fraction of ``{"prompt", "answer"}`` examples whose greedy answer equals ``answer``.

    Both sides are compared after ``strip()``, since subword tokenizers often decode a leading space.
    """
    if not examples:
        raise AdamergeError("exact_match needs at least one example")
    prompts = [ex["prompt"] for ex in examples]
    predictions = greedy_generate(model, tokenizer, prompts, max_new_tokens, batch_size)
    hits = sum(pred.strip() == str(ex["answer"]).strip() for pred, ex in zip(predictions, examples, strict=True))
    return hits / len(examples)


def evaluate_tasks(
    model: nn.Module, tokenizer, tasks: dict[str, Sequence[dict]], max_new_tokens: int = 16, batch_size: int = 128
) -> dict[str, float]:
    """Exact match per task, plus their unweighted mean under ``"avg"``."""
    if "avg" in tasks:
        raise AdamergeError("a task may not be named 'avg': that key holds the mean over tasks")
    scores = {name: exact_match(model, tokenizer, ex, max_new_tokens, batch_size) for name, ex in tasks.items()}
    return {**scores, "avg": sum(scores.values()) / max(len(scores), 1)}


def normalized_accuracy(scores: dict[str, float], expert_scores: dict[str, float]) -> dict[str, float]:
    """Merged score over the task's own expert score, per task and averaged (AdaMerging's headline metric).

    1.0 means the merged model matches the expert on its task; tasks are those of ``expert_scores``.
    """
    tasks = [t for t in expert_scores if t != "avg"]
    missing = [t for t in tasks if t not in scores]
    if missing:
        raise AdamergeError(f"no merged score for task(s) {missing}")
    zero = [t for t in tasks if expert_scores[t] <= 0]
    if zero:
        raise AdamergeError(f"expert score is 0 for task(s) {zero}: nothing to normalize by")
    normalized = {t: scores[t] / expert_scores[t] for t in tasks}
    return {**normalized, "avg": sum(normalized.values()) / max(len(normalized), 1)}


@torch.no_grad()
def accuracy(model: nn.Module, tokenizer, examples: Sequence[Mapping], batch_size: int = 128, field: str = "text",
             label_field: str = "label") -> float:
    """Fraction of examples where a classifier's argmax logit is the integer label.

    ``tokenizer`` may be an image processor; ``field`` then holds images (``Collator``'s classifier inputs).
    """
    if not len(examples):
        raise AdamergeError("accuracy needs at least one example")
    device = _device(model)
    was_training = model.training
    model.eval()
    collate = Collator(tokenizer, field=field, causal=False, label_field=label_field)
    try:
        hits = 0
        for batch in DataLoader(Examples(examples), batch_size=batch_size, collate_fn=collate):
            logits = model(**{k: v.to(device) for k, v in model_inputs(batch).items()}).logits
            if logits.dim() != 2:
                raise AdamergeError(f"accuracy needs (batch, labels) logits of a classifier, got {tuple(logits.shape)}")
            hits += int((logits.argmax(-1) == batch["labels"].to(device)).sum())
        return hits / len(examples)
    finally:
        model.train(was_training)


def evaluate_model(model_for: Callable[[str], torch.nn.Module], tokenizer, cfg: Mapping, causal: bool
                   ) -> dict[str, float]:
    """Score ``model_for(task)`` on each task of ``eval.tests`` (JSONL or ``{dataset, split}``): exact match
    (generative) or accuracy (classifiers, ``eval.field`` holding text or images, ``eval.label_field``)."""
    field, label_field = cfg.get("field", "text"), cfg.get("label_field", "label")
    tests = load_test_sets(cfg, causal)
    if not tests:
        return {}
    batch_size = cfg.get("batch_size", 64)
    scores = {
        t: exact_match(model_for(t), tokenizer, rows, cfg.get("max_new_tokens", 16), batch_size) if causal
        else accuracy(model_for(t), tokenizer, rows, batch_size, field, label_field)
        for t, rows in tests.items()
    }
    return {**scores, "avg": sum(scores.values()) / len(scores)}


def evaluate_merged(merged: MergedModel, tokenizer, cfg: Mapping, causal: bool,
                    folded: torch.nn.Module | None = None) -> dict[str, float]:
    """Evaluate the folded merge: one model for all tasks (``folded``, where the run already folded it), or
    backbone + head k per task."""
    if not cfg.get("tests"):
        return {}
    shared = None if len(merged.heads) else folded if folded is not None else merged.fold()
    return evaluate_model(lambda task: shared if shared is not None else merged.fold(task), tokenizer, cfg, causal)


def task_vectors_and_references(pool: ExpertPool, cfg: Mapping, seed: int, harness: HarnessOptions | None,
                                tokenizer) -> tuple[TaskVectors, dict]:
    """``build_task_vectors``, with the harness scores of the base and (``eval.harness.experts``) each expert taken
    in between: on the raw task vectors, so an expert is the one the pool gave, not its ``pool.preprocess``ed self."""
    raw = raw_task_vectors(pool, cfg)
    if harness is None:
        return prepare_task_vectors(raw, cfg, seed), {}
    teacher = MergedModel(pool.base, raw, Task(init=0.0))

    def expert(name: str) -> torch.nn.Module:
        with teacher.as_expert(name):
            return teacher.fold()

    scores = reference_scores(harness, pool.base, {n: lambda n=n: expert(n) for n in teacher.experts}, tokenizer)
    return prepare_task_vectors(raw, cfg, seed), scores


@torch.no_grad()
def fold_difference(merged: MergedModel, folded, batch: Mapping[str, torch.Tensor]) -> float:
    """Max |logits(folded) - logits(merged)| on one batch: the fold's self-check."""

    inputs = {k: v.to(merged.base.device) for k, v in model_inputs(batch).items()}
    logits = merged(**inputs).logits.float()  # the folded model may have more: the rows of experts' added tokens
    return (folded(**inputs).logits[..., : logits.shape[-1]].float() - logits).abs().max().item()
