"""The Objective interface and the scoring convention every objective shares.

A causal-LM batch is left-padded; an objective scores the *last n_i positions* of row i: the
position that predicts the answer's first token (``positions=last``), with
``positions=generated`` every position that predicts a token of a greedy continuation, or with
``positions=all`` every non-padded position of the calibration text, teacher-forced. Because
rows are right-aligned, the scored logits are ``logits[:, -P:]`` with a ``(B, P)`` mask. A
classifier's logits ``(B, C)`` are one scored position per row.

What an objective needs from the run is declared on its class, not guessed from its name by the
caller: ``needs_data`` (calibration rows per task), ``needs_labels`` (rows carry the answer or
label), ``supports_offload`` (works with task vectors in host memory, ``pool.offload=cpu``),
``dropout`` (the mode the paper's training loop runs the model in), and ``state_tensors`` /
``load_state_tensors`` for tensors of its own that the fold needs (DOGE's deltas).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from adamerge.data import left_pad, position_ids
from adamerge.errors import AdamergeError
from adamerge.generation import greedy_continuations

POSITIONS = ("last", "generated", "all")


class Objective:
    """One loss per task's batch, an optional coefficient regularizer, optional setup and hooks.

    Args:
        positions: which causal-LM positions are scored (see module docstring).
        new_tokens: length of greedy continuations when ``positions=generated``.
        task_weights: task -> weight of its loss (default 1); the module applies them.
        dropout: train with dropout on (train mode) or off (eval mode); None: as the paper's loop
            (the class's ``dropout``).
    """

    needs_data = True  # calibration rows per task (else one placeholder batch per step)
    needs_labels = False  # rows carry the answer (causal LM) or label (classifier)
    supports_offload = True  # works with task vectors in host memory (pool.offload=cpu)
    dropout = False  # the mode of the paper's training loop: True = train mode (dropout on)
    state_prefix = "objective."  # keys of ``state_tensors`` in the saved coefficients file

    def __init__(self, positions: str = "last", new_tokens: int = 8, task_weights: Mapping[str, float] | None = None,
                 dropout: bool | None = None):
        if positions not in POSITIONS:
            raise AdamergeError(f"objective.positions={positions!r}; choose from {list(POSITIONS)}")
        self.positions, self.new_tokens = positions, new_tokens
        self.task_weights = dict(task_weights or {})
        self.pad_id, self.eos_id = 0, None
        if dropout is not None:
            self.dropout = bool(dropout)

    def setup(self, merged: nn.Module, data, tokenizer=None) -> None:
        """Called once before training (teachers are cached here)."""
        if hasattr(tokenizer, "pad_token_id"):  # a tokenizer (not None, not an image processor)
            self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
            self.eos_id = tokenizer.eos_token_id

    def task_loss(self, merged: nn.Module, task: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def regularizer(self, merged: nn.Module) -> torch.Tensor | None:
        return None

    def extra_parameters(self) -> list[nn.Parameter]:
        """Extra trainable tensors besides the coefficients (DOGE's deltas)."""
        return []

    def after_backward(self, merged: nn.Module) -> None:
        """Hook between backward and the optimizer step (DOGE projects gradients here)."""

    def finish(self, merged: nn.Module) -> None:
        """Called after training, before the fold (DOGE writes its adjusted task vectors here)."""

    # Trainable tensors of its own that the fold needs (DOGE's and WUDI's deltas): the attribute holding them
    # (a ParameterDict keyed by tensor name, "/" for "."), the key they are saved under, and what they are called.
    own_tensors: str | None = None
    saved_as = ""
    saved_what = ""

    def _saved_key(self, key: str) -> str:
        return f"{self.state_prefix}{self.saved_as}.{key.replace('/', '.')}"

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors of its own stored beside the coefficients (keys start with ``state_prefix``), so
        that ``adamerge fold`` can redo the fold."""
        own = getattr(self, self.own_tensors) if self.own_tensors else {}
        return {self._saved_key(key): t.detach() for key, t in own.items()}

    @torch.no_grad()
    def load_state_tensors(self, merged: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
        """Put ``merged`` in the state ``finish`` left it in, from saved ``state_tensors`` (the file
        may hold other keys too)."""
        if not self.own_tensors:
            return
        self.setup(merged, None)
        for key, own in getattr(self, self.own_tensors).items():
            saved = tensors.get(self._saved_key(key))
            if saved is None:
                raise AdamergeError(f"the saved coefficients hold no {self.saved_what} for {key.replace('/', '.')!r}")
            own.copy_(saved)
        self.finish(merged)

    # ---- scoring helpers shared by the objectives ----------------------------------------------

    def scored_rows(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[list[torch.Tensor], list[int]]:
        """Token rows to run and how many trailing positions of each are scored."""
        rows = [ids[m.bool()] for ids, m in zip(batch["input_ids"], batch["attention_mask"], strict=True)]
        if self.positions == "last":
            return rows, [1] * len(rows)
        if self.positions == "all":
            return rows, [len(r) for r in rows]
        gens = greedy_continuations(model, batch["input_ids"], batch["attention_mask"], self.new_tokens, self.eos_id)
        return [torch.cat([r, g[:-1]]) for r, g in zip(rows, gens, strict=True)], [max(len(g), 1) for g in gens]


def is_causal_batch(batch: Mapping[str, torch.Tensor]) -> bool:
    return "position_ids" in batch


def pack_rows(rows: Sequence[torch.Tensor], n_scored: Sequence[int], pad_id: int) -> tuple[dict, torch.Tensor]:
    """Left-pad rows into model inputs and a ``(B, P)`` mask of the scored trailing positions."""
    ids, mask = left_pad(rows, pad_id)
    p = max(n_scored)
    scored = torch.arange(p, device=ids.device).flip(0)[None, :] < torch.tensor(n_scored, device=ids.device)[:, None]
    return {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids(mask)}, scored


def scored_logits(logits: torch.Tensor, p: int) -> torch.Tensor:
    """``(B, P, V)`` logits of the scored positions; a classifier's ``(B, C)`` becomes ``(B, 1, C)``."""
    return logits[:, None] if logits.dim() == 2 else logits[:, -p:]


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy of softmax(logits) over the last dim, in nats, computed in fp32."""
    logp = torch.log_softmax(logits.float(), -1)
    return -(logp.exp() * logp).sum(-1)
