"""Supervised fine-tuning for the zoos: one short loop (``train_steps``) for every model they train.

For the tiny causal LMs (``train_lm``) the loss covers the answer and its eos only (prompts are
random, predicting them teaches nothing). Their batches are right-padded without an attention
mask: every row starts at position 0, so causal attention never lets a real token see a pad, and
pads carry no loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import logging as hf_logging

IGNORE = -100


def encode_rows(tokenizer, rows: list[dict[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels), right-padded: ``bos prompt answer eos``, labels set on ``answer eos`` only."""
    if not rows:
        raise ValueError("no rows to encode")
    seqs, labels = [], []
    for row in rows:
        prompt = tokenizer(row["prompt"])["input_ids"]
        answer = tokenizer(row["answer"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        seqs.append(prompt + answer)
        labels.append([IGNORE] * len(prompt) + answer)
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id, dtype=torch.long)
    lab = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
    for i, (seq, label) in enumerate(zip(seqs, labels, strict=True)):
        ids[i, : len(seq)] = torch.tensor(seq)
        lab[i, : len(label)] = torch.tensor(label)
    return ids, lab


def _warmup_cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_lm(
    model: nn.Module,
    data: tuple[torch.Tensor, torch.Tensor],
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    params: Iterable[nn.Parameter] | None = None,
) -> float:
    """Next-token loss on the answers of ``data`` (see ``encode_rows``); returns the last loss.

    ``params`` defaults to all parameters that require grad (for a PEFT model: the adapters).
    """
    ids, labels = data

    def loss_of(idx: torch.Tensor) -> torch.Tensor:
        x, y = ids[idx], labels[idx]
        width = int((y != IGNORE).nonzero()[:, 1].max()) + 1  # drop columns that are pad in every row
        logits = model(input_ids=x[:, :width]).logits
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), y[:, 1:width].flatten())

    return train_steps(model, loss_of, len(ids), steps, lr, batch_size, seed, params)


def train_steps(
    model: nn.Module,
    loss_of: Callable[[torch.Tensor], torch.Tensor],
    n_rows: int,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    params: Iterable[nn.Parameter] | Iterable[dict] | None = None,
) -> float:
    """The zoos' one loop: AdamW, 10% warmup, cosine decay, ``loss_of(row indices)`` on random batches.

    Returns the last loss. ``params`` defaults to all parameters that require grad; parameter groups
    with their own ``lr`` are scheduled alike.
    """
    trainable = list(params) if params is not None else [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _warmup_cosine(s, steps, warmup))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        loss = loss_of(torch.randint(0, n_rows, (batch_size,), generator=gen))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    return float(loss.detach())


def clone_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A detached copy of a state dict, unaffected by later training of its model."""
    return {name: t.detach().clone() for name, t in state.items()}


@contextmanager
def _no_progress_bars() -> Iterator[None]:
    """A zoo saves many small models, each printing a 'Writing model shards' bar; restore the user's setting."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def save_quietly(model: nn.Module, tokenizer, path: Path) -> None:
    """``save_pretrained`` of a model and its tokenizer into ``path``, without progress bars."""
    with _no_progress_bars():
        model.save_pretrained(path)
    tokenizer.save_pretrained(path)
