"""Expert Merging's objective (arXiv 2509.25712, Sec. 3): align the merged model with expert k on task k.

For a batch of task k the teacher is expert k alone. Loss =
``alpha_k * [T^2 * KL(teacher/T || merged/T) + w_h * mean_l MSE(h_l merged, h_l teacher)]
+ gamma * mean |c - init|``. Teachers are the merged model in teacher mode (``as_expert``), so no
expert model is ever held in memory: ``teacher=cached`` runs them once before training (in eval
mode, as Expert Merging's ``teacher_model.eval()``) and keeps their top-k logits and chosen
hidden states per example; ``teacher=online`` runs them on each step's batch, without gradient,
in the training mode (DAM's ``generate_logits_on_fly``), which holds nothing between steps.

The student trains in train mode (dropout on), as Expert Merging's loop (github.com/Littleor/ExpertMerging,
``InternVL/parametric_task_vector_model.py``, ``train_step``: ``teacher_model.eval()``, then
``self.student_model.train()``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from adamerge.data import model_inputs
from adamerge.errors import AdamergeError
from adamerge.objectives.base import (
    Objective,
    is_causal_batch,
    masked_mean,
    pack_rows,
    scored_logits,
)


@dataclass
class TeacherRow:
    ids: torch.Tensor | None  # tokens run for this example (causal LMs; None: use the batch as is)
    top_values: torch.Tensor  # (n, k) teacher log-probabilities (at temperature T) at the n scored positions
    top_indices: torch.Tensor  # (n, k) their vocabulary / class ids
    hidden: torch.Tensor | None  # (layers, n, H) teacher hidden states at the scored positions


def right_aligned(tensors: Sequence[torch.Tensor], length: int) -> torch.Tensor:
    """Stack ``(n_i, ...)`` tensors into ``(B, length, ...)``, each placed at the end (zeros before)."""
    out = tensors[0].new_zeros((len(tensors), length, *tensors[0].shape[1:]))
    for i, t in enumerate(tensors):
        out[i, length - len(t) :] = t
    return out


def hidden_at(hidden_states: Sequence[torch.Tensor], layers: Sequence[int], p: int, causal: bool) -> torch.Tensor:
    """``(B, layers, P, H)``: the last P positions (causal) or the first token (encoders' [CLS])."""
    picked = [hidden_states[i][:, -p:] if causal else hidden_states[i][:, :1] for i in layers]
    return torch.stack(picked, 1)


def topk_kl(top_logp: torch.Tensor, top_indices: torch.Tensor, student_logits: torch.Tensor, t: float):
    """KL(teacher || student) per position over the teacher's top-k tokens plus one "rest" bucket.

    ``top_logp`` are the teacher's log-probabilities at temperature t. Lumping the other tokens
    into one bucket keeps the loss an exact KL between two distributions (zero when the student
    is the teacher); with k = vocabulary size it is the full KL.
    """
    log_student = torch.log_softmax(student_logits.float() / t, -1).gather(-1, top_indices)
    p_teacher = top_logp.float().exp()
    top = (p_teacher * (top_logp.float() - log_student)).sum(-1)
    rest_teacher = (1 - p_teacher.sum(-1)).clamp(min=0)
    rest_student = (1 - log_student.exp().sum(-1)).clamp(min=1e-12)
    return top + rest_teacher * (torch.log(rest_teacher.clamp(min=1e-12)) - torch.log(rest_student))


TEACHERS = ("cached", "online")


class Align(Objective):
    """Args: temperature T, hidden_weight w_h, hidden_layers (hidden_states indices; default the
    middle layer), coef_reg gamma, top_k teacher logits kept (None: all), teacher (``cached`` or
    ``online``, see the module docstring)."""

    dropout = True

    def __init__(self, temperature: float = 1.0, hidden_weight: float = 1.0, hidden_layers: Sequence[int] | None = None,
                 coef_reg: float = 1.0, top_k: int | None = 64, teacher: str = "cached", **kwargs) -> None:
        super().__init__(**kwargs)
        if teacher not in TEACHERS:
            raise AdamergeError(f"objective.teacher={teacher!r}; choose from {list(TEACHERS)}")
        self.temperature, self.hidden_weight, self.coef_reg, self.top_k = temperature, hidden_weight, coef_reg, top_k
        self.hidden_layers = list(hidden_layers) if hidden_layers is not None else None
        self.teacher = teacher
        self.cache: dict[str, list[TeacherRow]] = {}

    def setup(self, merged, data, tokenizer=None) -> None:
        super().setup(merged, data, tokenizer)
        if self.hidden_layers is None:
            self.hidden_layers = [merged.base.config.num_hidden_layers // 2]
        self.init = merged.granularity.init_values(merged.experts)
        if self.teacher == "cached":
            for task in data.datasets:
                self.cache[task] = self.teacher_rows(merged, task, data.loader(task, shuffle=False))

    def teacher_rows(self, merged, task: str, loader) -> list[TeacherRow]:
        """Teacher outputs for every example of a task, in loader order (indexed by ``batch["index"]``)."""
        rows: list[TeacherRow] = []
        for batch in loader:
            rows += self.teacher_batch(merged, task, {k: v.to(merged.base.device) for k, v in batch.items()})
        return rows

    @torch.no_grad()
    def teacher_batch(self, merged, task: str, batch: dict[str, torch.Tensor]) -> list[TeacherRow]:
        """Expert ``task``'s outputs at the scored positions of each row of a batch."""
        rows: list[TeacherRow] = []
        with merged.as_expert(task):
            inputs, scored, ids = self.student_inputs(merged, batch)
            out = merged(**inputs, output_hidden_states=self.hidden_weight > 0)
        p = scored.shape[1]
        logp = torch.log_softmax(scored_logits(out.logits, p).float() / self.temperature, -1)
        values, indices = logp.topk(min(self.top_k or logp.shape[-1], logp.shape[-1]), -1)
        hidden = hidden_at(out.hidden_states, self.hidden_layers, p, ids is not None) \
            if self.hidden_weight > 0 else None
        for i, n in enumerate(scored.sum(1).tolist()):
            rows.append(TeacherRow(None if ids is None else ids[i], values[i, -n:], indices[i, -n:],
                                   None if hidden is None else hidden[i, :, -n:]))
        return rows

    def student_inputs(self, model, batch):
        """Inputs, scored mask and per-row token ids (None for classifiers) for a calibration batch."""
        if not is_causal_batch(batch):
            return model_inputs(batch), torch.ones(len(batch["input_ids"]), 1, dtype=torch.bool), None
        rows, n_scored = self.scored_rows(model, batch)
        inputs, scored = pack_rows(rows, n_scored, self.pad_id)
        return inputs, scored, rows

    def task_loss(self, merged, task: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.teacher == "online":
            teacher = self.teacher_batch(merged, task, batch)
        else:
            teacher = [self.cache[task][i] for i in batch["index"].tolist()]
        causal = teacher[0].ids is not None
        if causal:
            inputs, scored = pack_rows([t.ids for t in teacher], [len(t.top_values) for t in teacher], self.pad_id)
        else:
            inputs, scored = model_inputs(batch), torch.ones(len(teacher), 1, dtype=torch.bool)
        p = scored.shape[1]
        out = merged(**inputs, output_hidden_states=self.hidden_weight > 0)
        values = right_aligned([t.top_values for t in teacher], p)
        indices = right_aligned([t.top_indices for t in teacher], p)
        kl = topk_kl(values, indices, scored_logits(out.logits, p), self.temperature)
        loss = self.temperature**2 * masked_mean(kl, scored.to(kl.device))
        if self.hidden_weight > 0:
            student = hidden_at(out.hidden_states, self.hidden_layers, p, causal)
            target = right_aligned([t.hidden.transpose(0, 1) for t in teacher], p).transpose(1, 2)
            mse = ((student.float() - target.float()) ** 2).mean(-1)  # (B, layers, P)
            loss = loss + self.hidden_weight * masked_mean(mse, scored[:, None].expand_as(mse).to(mse.device))
        return loss

    def regularizer(self, merged) -> torch.Tensor | None:
        """gamma * mean |c - init| over every coefficient: keeps the merge near its start (Sec. 3.3)."""
        if not self.coef_reg:
            return None
        init = self.init.to(next(iter(merged.granularity.raw.values())).device)
        devs = [(c - init[:, None]).abs().flatten() for c in merged.granularity.groups().values()]
        return self.coef_reg * torch.cat(devs).mean()
