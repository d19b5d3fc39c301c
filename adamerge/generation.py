"""Greedy continuations of left-padded batches, for any module with a Hugging Face-style forward.

Used by objectives that score generated answers (entropy over the merged model's own greedy
continuation, align/dam teachers' continuations) and by evaluation. No KV cache: continuations
are short and the model may be a ``MergedModel`` whose weights change every step.
"""

from __future__ import annotations

import torch
from torch import nn

from adamerge.data import position_ids


@torch.no_grad()
def greedy_continuations(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, new_tokens: int,
    eos_token_id: int | None = None,
) -> list[torch.Tensor]:
    """Up to ``new_tokens`` greedy tokens per row, cut after the row's first eos (kept)."""
    ids, mask = input_ids, attention_mask
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    steps = []
    for _ in range(new_tokens):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits
        nxt = logits[:, -1].argmax(-1)
        steps.append(torch.where(done, -1, nxt))
        ids = torch.cat([ids, nxt[:, None]], 1)
        mask = torch.cat([mask, (~done).long()[:, None]], 1)
        if eos_token_id is not None:
            done |= nxt == eos_token_id
        if done.all():
            break
    if not steps:
        return [input_ids.new_empty(0) for _ in range(input_ids.shape[0])]
    table = torch.stack(steps, 1)
    return [row[row >= 0] for row in table]
