"""Objectives and their scoring conventions on a tiny Llama: padding never changes a loss, teachers
are the right experts, the losses are zero where they should be, regularizers are their formulas."""

from __future__ import annotations

import math

import pytest
import torch
from tiny import build_module, tiny_parts

from adamerge.data import Collator
from adamerge.errors import AdamergeError
from adamerge.generation import greedy_continuations
from adamerge.objectives import Align, CrossEntropy, Dam, Entropy, Objective
from adamerge.objectives.align import topk_kl
from adamerge.objectives.base import entropy, pack_rows
from adamerge.objectives.dam import mean_pairwise_cosine


@pytest.fixture(scope="module")
def parts():
    return tiny_parts()


@pytest.fixture(scope="module")
def tok(parts):
    return parts.tokenizer


def collate(tok, rows, **kwargs) -> dict[str, torch.Tensor]:
    return Collator(tok, **kwargs)(list(enumerate(rows)))


def test_entropy_of_uniform_and_peaked_logits():
    assert entropy(torch.zeros(3, 10)).tolist() == pytest.approx([math.log(10)] * 3)
    assert entropy(torch.tensor([[100.0, 0.0, 0.0]])).item() == pytest.approx(0.0, abs=1e-6)


def test_collator_left_pads_and_masks_the_prompt_in_labels(tok):
    rows = [{"prompt": "add 1+2=", "answer": "3"}, {"prompt": "add 10+20=", "answer": "30"}]
    batch = collate(tok, rows, answer_field="answer")
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    short = tok("add 1+2=")["input_ids"] + tok("3", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ids[0, -len(short):].tolist() == short
    assert ids[0, : ids.shape[1] - len(short)].eq(tok.pad_token_id).all()
    assert mask[0].tolist() == [0] * (ids.shape[1] - len(short)) + [1] * len(short)
    assert batch["position_ids"][0, -len(short):].tolist() == list(range(len(short)))
    answer = tok("30", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert labels[1, -len(answer):].tolist() == answer
    assert labels[1, : -len(answer)].eq(-100).all()
    assert batch["index"].tolist() == [0, 1]


def test_positions_must_be_known():
    with pytest.raises(AdamergeError, match="objective.positions='every'"):
        Objective(positions="every")


@pytest.mark.parametrize("positions", ["last", "generated"])
def test_entropy_loss_does_not_depend_on_padding(parts, tok, positions):
    """A left-padded batch scores exactly what each row scores alone (weighted by scored positions)."""
    merged, _, _ = build_module(parts, {"name": "column"}, {"name": "entropy"})
    objective = Entropy(positions=positions, new_tokens=4)
    objective.setup(merged, None, tok)
    rows = parts.rows["add"] + parts.rows["rev"]
    assert len({len(r["prompt"]) for r in rows}) > 3  # really padded
    with torch.no_grad():
        batched = objective.task_loss(merged, "add", collate(tok, rows))
        singles = []
        for r in rows:
            batch = collate(tok, [r])
            _, n = objective.scored_rows(merged, batch)
            singles.append((objective.task_loss(merged, "add", batch), n[0]))
    expected = sum(loss * n for loss, n in singles) / sum(n for _, n in singles)
    torch.testing.assert_close(batched, expected, rtol=0, atol=1e-5)


def test_greedy_continuations_of_a_padded_batch_match_each_row_alone(parts, tok):
    base = parts.pool.base
    batch = collate(tok, parts.rows["rev"])
    alone = [greedy_continuations(base, *(collate(tok, [r])[k] for k in ("input_ids", "attention_mask")), 5)[0]
             for r in parts.rows["rev"]]
    eos = int(alone[0][1])  # a token row 0 emits second: its continuation must stop there
    batched = greedy_continuations(base, batch["input_ids"], batch["attention_mask"], 5, eos_token_id=eos)
    for row, full in zip(batched, alone, strict=True):
        cut = (full == eos).nonzero()
        expected = full[: int(cut[0]) + 1] if len(cut) else full
        assert row.tolist() == expected.tolist()
    assert batched[0].tolist() == alone[0][:2].tolist()


def test_generated_positions_score_the_continuation(parts, tok):
    objective = Entropy(positions="generated", new_tokens=3)
    batch = collate(tok, parts.rows["add"][:2])
    rows, n_scored = objective.scored_rows(parts.pool.base, batch)
    gens = greedy_continuations(parts.pool.base, batch["input_ids"], batch["attention_mask"], 3)
    for row, n, gen, ids, mask in zip(rows, n_scored, gens, batch["input_ids"], batch["attention_mask"],
                                      strict=True):
        assert n == len(gen) == 3
        assert row.tolist() == ids[mask.bool()].tolist() + gen[:-1].tolist()
    inputs, scored = pack_rows(rows, n_scored, tok.pad_token_id)
    assert scored.shape == (2, 3) and scored.all()
    assert inputs["input_ids"].shape[1] == max(len(r) for r in rows)


@pytest.mark.parametrize("name", ["align", "dam"])
@pytest.mark.parametrize("positions", ["last", "generated"])
def test_teacher_losses_vanish_at_the_teacher(parts, name, positions):
    """One-hot coefficients on expert k make the merged model expert k: task k's loss is zero, the
    other task's is not (each task is distilled from its own expert)."""
    cfg = {"name": name, "positions": positions, "new_tokens": 3, "top_k": None}
    merged, data, module = build_module(parts, {"name": "layer", "init": {"add": 1.0, "rev": 0.0}}, cfg)
    with torch.no_grad():
        losses = {t: float(module.objective.task_loss(merged, t, next(iter(data.loader(t, shuffle=False)))))
                  for t in data.datasets}
    assert losses["add"] == pytest.approx(0.0, abs=1e-6)
    assert losses["rev"] > 1e-3


def test_align_caches_one_teacher_row_per_example(parts, tok):
    merged, data, module = build_module(parts, {"name": "layer"}, {"name": "align", "positions": "last",
                                                                   "top_k": 5})
    objective: Align = module.objective
    assert objective.hidden_layers == [merged.base.config.num_hidden_layers // 2]
    for task, rows in parts.rows.items():
        cache = objective.cache[task]
        assert len(cache) == len(rows)
        for row, teacher in zip(rows, cache, strict=True):
            assert teacher.ids.tolist() == tok(row["prompt"])["input_ids"]
            assert teacher.top_values.shape == teacher.top_indices.shape == (1, 5)
            assert teacher.hidden.shape == (1, 1, merged.base.config.hidden_size)


def test_topk_kl_with_every_logit_is_the_kl_divergence():
    gen = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(4, 7, generator=gen), torch.randn(4, 7, generator=gen)
    for t in (1.0, 2.0):
        values, indices = torch.log_softmax(teacher / t, -1).topk(7, -1)
        expected = torch.nn.functional.kl_div(torch.log_softmax(student / t, -1), torch.log_softmax(teacher / t, -1),
                                              log_target=True, reduction="none").sum(-1)
        torch.testing.assert_close(topk_kl(values, indices, student, t), expected, rtol=1e-5, atol=1e-6)


def test_topk_kl_is_zero_at_the_teacher_and_positive_elsewhere():
    gen = torch.Generator().manual_seed(1)
    teacher, student = torch.randn(4, 50, generator=gen), torch.randn(4, 50, generator=gen)
    for t in (1.0, 2.0):
        values, indices = torch.log_softmax(teacher / t, -1).topk(5, -1)
        assert topk_kl(values, indices, teacher, t).abs().max() < 1e-5
        assert (topk_kl(values, indices, student, t) > 1e-3).all()


def test_align_regularizer_is_mean_distance_to_init(parts):
    merged, _, module = build_module(parts, {"name": "block", "partitions": 2},
                                     {"name": "align", "positions": "last", "coef_reg": 0.5})
    objective: Align = module.objective
    assert float(objective.regularizer(merged)) == 0.0
    with torch.no_grad():
        for p in merged.granularity.raw.values():
            p.add_(0.2)
    assert float(objective.regularizer(merged)) == pytest.approx(0.5 * 0.2, rel=1e-5)
    assert Align(coef_reg=0.0).regularizer(merged) is None


def test_dam_regularizer_is_cosine_plus_l1_l2(parts):
    assert float(mean_pairwise_cosine(torch.tensor([[1.0, 2.0], [2.0, 4.0]]))) == pytest.approx(1.0)
    assert float(mean_pairwise_cosine(torch.tensor([[1.0, 0.0], [0.0, 3.0]]))) == pytest.approx(0.0)
    assert float(mean_pairwise_cosine(torch.tensor([[1.0, 2.0]]))) == 0.0  # one expert: no pairs
    merged, _, _ = build_module(parts, {"name": "column", "init": {"add": 0.2, "rev": 0.5}}, {"name": "entropy"})
    dam = Dam(lambda_sim=0.1, lambda_l1=0.01, lambda_l2=0.001)
    groups = list(merged.granularity.groups().values())
    flat = torch.cat([g.flatten() for g in groups])
    expected = 0.1 * 1.0 + 0.01 * flat.abs().sum() + 0.001 * flat.pow(2).sum()  # parallel rows: cosine 1
    assert float(dam.regularizer(merged)) == pytest.approx(float(expected), rel=1e-5)


def test_cross_entropy_scores_the_answer_tokens_only(parts, tok):
    merged, _, _ = build_module(parts, {"name": "layer"}, {"name": "entropy"})
    rows = parts.rows["add"][:3]
    with torch.no_grad():
        loss = CrossEntropy().task_loss(merged, "add", collate(tok, rows, answer_field="answer"))
        total, count = 0.0, 0
        for r in rows:
            prompt = tok(r["prompt"])["input_ids"]
            answer = tok(r["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            ids = torch.tensor([prompt + answer])
            logp = torch.log_softmax(merged(input_ids=ids).logits[0, :-1], -1)
            targets = ids[0, 1:]
            scored = torch.arange(len(targets)) >= len(prompt) - 1
            total -= float(logp[scored].gather(-1, targets[scored, None]).sum())
            count += int(scored.sum())
    assert float(loss) == pytest.approx(total / count, rel=1e-5)
