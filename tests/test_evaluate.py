"""Per-task metrics on hand-wired fakes (known answers) and a tiny random Llama (padding invariance)."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from adamerge.errors import AdamergeError
from adamerge.evaluate import (
    accuracy,
    evaluate_tasks,
    exact_match,
    greedy_generate,
    load_jsonl,
    normalized_accuracy,
)
from adamerge.zoo.tokenizer import char_tokenizer


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


class Answers4(nn.Module):
    """Says "4" right after "=", then eos; records what it was called with."""

    def __init__(self, tok):
        super().__init__()
        self.tok, self.calls = tok, []

    def forward(self, input_ids, attention_mask, position_ids):
        self.calls.append((input_ids, attention_mask, position_ids))
        equals, four = self.tok.convert_tokens_to_ids(["=", "4"])
        nxt = torch.where(input_ids[:, -1] == equals, four, self.tok.eos_token_id)
        return SimpleNamespace(logits=nn.functional.one_hot(nxt, len(self.tok)).float()[:, None, :])


def tiny_llama(tok, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def test_load_jsonl_reads_objects_and_skips_blank_lines(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"prompt": "rev ab=", "answer": "ba"}\n\n{"prompt": "__import__(\'os\')"}\n')
    assert load_jsonl(path) == [{"prompt": "rev ab=", "answer": "ba"}, {"prompt": "__import__('os')"}]


@pytest.mark.parametrize(
    ("line", "message"),
    [("{oops}", r"rows.jsonl:2: not valid JSON"), ("[1, 2]", r"rows.jsonl:2: expected a JSON object")],
)
def test_load_jsonl_names_the_bad_line(tmp_path, line, message):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"prompt": "x"}\n' + line + "\n")
    with pytest.raises(AdamergeError, match=message):
        load_jsonl(path)


def test_greedy_generate_stops_at_eos_and_left_pads(tok):
    model = Answers4(tok)
    assert greedy_generate(model, tok, ["add 1+3=", "sort dcba="], max_new_tokens=5) == ["4", "4"]
    ids, mask, pos = model.calls[0]
    assert mask[0].tolist() == [0, 0] + [1] * 9  # the shorter prompt is padded on the left
    assert pos[0, 2:].tolist() == list(range(9)) and pos[1].tolist() == list(range(11))
    assert len(model.calls) == 2  # one step for "4", one for eos, then every row is done


def test_exact_match_counts_equal_answers(tok):
    examples = [{"prompt": "a=", "answer": "4"}, {"prompt": "b=", "answer": 4}, {"prompt": "c=", "answer": "5"}]
    assert exact_match(Answers4(tok), tok, examples) == pytest.approx(2 / 3)
    with pytest.raises(AdamergeError, match="at least one example"):
        exact_match(Answers4(tok), tok, [])


def test_left_padding_gives_the_unpadded_greedy_output(tok):
    model = tiny_llama(tok)
    prompts = ["rev ab=", "count abcdefgh=", "next abc=", "sort hgfedcbaab="]
    alone = [greedy_generate(model, tok, [p], max_new_tokens=6)[0] for p in prompts]
    assert greedy_generate(model, tok, prompts, max_new_tokens=6, batch_size=3) == alone
    assert any(alone)  # the random model does say something, so the comparison has teeth


def test_greedy_generate_restores_training_mode(tok):
    model = tiny_llama(tok).train()
    greedy_generate(model, tok, ["rev ab="], max_new_tokens=2)
    assert model.training


def test_evaluate_tasks_reports_each_task_and_the_mean(tok):
    tasks = {"four": [{"prompt": "a=", "answer": "4"}], "five": [{"prompt": "a=", "answer": "5"}]}
    assert evaluate_tasks(Answers4(tok), tok, tasks) == {"four": 1.0, "five": 0.0, "avg": 0.5}
    with pytest.raises(AdamergeError, match="may not be named 'avg'"):
        evaluate_tasks(Answers4(tok), tok, {"avg": tasks["four"]})


def test_normalized_accuracy_divides_by_the_own_expert():
    merged = {"rev": 0.45, "sort": 0.8, "avg": 0.625}
    experts = {"rev": 0.9, "sort": 0.8}
    assert normalized_accuracy(merged, experts) == pytest.approx({"rev": 0.5, "sort": 1.0, "avg": 0.75})
    with pytest.raises(AdamergeError, match=r"no merged score for task\(s\) \['next'\]"):
        normalized_accuracy(merged, {**experts, "next": 1.0})
    with pytest.raises(AdamergeError, match=r"expert score is 0 for task\(s\) \['rev'\]"):
        normalized_accuracy(merged, {"rev": 0.0})


class SaysLabelOne(nn.Module):
    """A classifier that always prefers label 1."""

    def forward(self, input_ids, attention_mask):
        return SimpleNamespace(logits=torch.tensor([[0.0, 1.0]]).expand(len(input_ids), 2))


def test_accuracy_compares_argmax_with_label(tok):
    examples = [{"text": "ab", "label": 1}, {"text": "abc", "label": 0}, {"text": "b", "label": 1}]
    assert accuracy(SaysLabelOne(), tok, examples, batch_size=2) == pytest.approx(2 / 3)


def test_accuracy_rejects_language_model_logits(tok):
    with pytest.raises(AdamergeError, match=r"needs \(batch, labels\) logits"):
        accuracy(tiny_llama(tok), tok, [{"text": "ab", "label": 0}])
