"""Experts with extended vocabularies (adamerge/vocab.py): shared rows merged as usual, added rows by token string.

Two tiny Llama experts of the char-tokenizer base add tokens: ``add`` adds ``<a>`` and ``<both>``, ``rev``
adds ``<both>`` and ``<b>`` (so ``<both>`` has another id in each). The merge is task arithmetic written
through ``adamerge.run.run``; the output must load with the Auto classes and hold the union vocabulary.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import task_rows, tiny_expert, tiny_llama

from adamerge import AdamergeError, ExpertPool
from adamerge.run import run
from adamerge.zoo.tokenizer import char_tokenizer

ADDED = {"add": ["<a>", "<both>"], "rev": ["<both>", "<b>"]}
INIT = 0.4
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def expert_with_tokens(base, k: int, tokens: list[str], directory: Path) -> None:
    """Expert k of the base, grown by ``tokens`` (seeded rows), saved with its tokenizer."""
    tokenizer = char_tokenizer()
    tokenizer.add_tokens(tokens)
    model = tiny_expert(base, k)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    gen = torch.Generator().manual_seed(50 + k)
    with torch.no_grad():
        for p in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
            p[-len(tokens):] = torch.randn(len(tokens), p.shape[1], generator=gen)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vocab")
    base = tiny_llama()
    base.save_pretrained(root / "base")
    char_tokenizer().save_pretrained(root / "base")
    for k, (name, tokens) in enumerate(ADDED.items()):
        expert_with_tokens(base, k, tokens, root / name)
    return root


def merge(zoo: Path, out: Path, *overrides: tuple[str, str], **sections) -> Path:
    """Task arithmetic (lambda ``INIT``) of the zoo written to ``out``; ``overrides`` are ``pool`` keys."""
    pool = {"base": str(zoo / "base"), "experts": {n: str(zoo / n) for n in ADDED}, **dict(overrides)}
    config = {"pool": pool, "granularity": {"name": "task", "init": INIT}, "objective": {"name": "entropy"},
              "trainer": {"max_steps": 0}, "output_dir": str(out), **sections}
    result = run(config, out.parent / "run")
    assert result.fold_max_diff is None or result.fold_max_diff < 1e-5  # the shared logits of the fold check
    return out


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


def row(zoo: Path, expert: str, token: str, name: str) -> torch.Tensor:
    """``expert``'s own row of ``token`` in tensor ``name`` (looked up by string in its tokenizer)."""
    from transformers import AutoTokenizer

    index = AutoTokenizer.from_pretrained(str(zoo / expert)).convert_tokens_to_ids(token)
    return weights(zoo / expert)[name][index]


def test_union_vocabulary_merges_shared_rows_and_keeps_added_ones(zoo, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = {}
    for task in ADDED:  # calibration rows: the fold check compares folded and merged logits on them
        data[task] = tmp_path / f"{task}.jsonl"
        data[task].write_text("".join(json.dumps(r) + "\n" for r in task_rows(task, 2)))
    out = merge(zoo, tmp_path / "merged", data={"paths": {t: str(p) for t, p in data.items()}})
    fold_check = [line for line in (out / "README.md").read_text().splitlines() if "fold max |diff|" in line]
    assert len(fold_check) == 1 and "None" not in fold_check[0], fold_check
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out))
    shared = len(char_tokenizer())
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<a>", "<both>", "<b>")}
    assert ids == {"<a>": shared, "<both>": shared + 1, "<b>": shared + 2}  # experts in order, each in its id order
    assert len(tokenizer) == model.config.vocab_size == shared + 3
    assert tokenizer("a<both>b")["input_ids"] == [1, char_tokenizer().convert_tokens_to_ids("a"), ids["<both>"],
                                                  char_tokenizer().convert_tokens_to_ids("b")]
    assert model.get_input_embeddings().weight.shape[0] == model.get_output_embeddings().weight.shape[0] == shared + 3

    merged, base = weights(out), weights(zoo / "base")
    experts = {n: weights(zoo / n) for n in ADDED}
    for name, w0 in base.items():  # the shared rows: task arithmetic W0 + c sum_k (W_k - W0), as without added tokens
        expected = w0 + INIT * sum(e[name][: w0.shape[0]] - w0 for e in experts.values())
        torch.testing.assert_close(merged[name][: w0.shape[0]], expected, rtol=0, atol=1e-6, msg=name)
    for name in (EMBED, HEAD):  # the added rows: the expert's own, or the mean where both added the token
        assert torch.equal(merged[name][ids["<a>"]], row(zoo, "add", "<a>", name))
        assert torch.equal(merged[name][ids["<b>"]], row(zoo, "rev", "<b>", name))
        both = (row(zoo, "add", "<both>", name) + row(zoo, "rev", "<both>", name)) / 2
        torch.testing.assert_close(merged[name][ids["<both>"]], both, rtol=0, atol=1e-7)
    model(**tokenizer(["a<both>b<b>"], return_tensors="pt"))  # the added ids run through the loaded model


def test_base_or_an_experts_tokenizer(zoo, tmp_path, caplog):
    from transformers import AutoTokenizer

    with caplog.at_level(logging.WARNING):
        out = merge(zoo, tmp_path / "base", ("tokenizer", "base"))
    assert weights(out)[EMBED].shape[0] == len(AutoTokenizer.from_pretrained(str(out))) == len(char_tokenizer())
    assert "3 token(s) added by experts are dropped" in caplog.text

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        out = merge(zoo, tmp_path / "rev", ("tokenizer", "rev"))
    tokenizer, merged = AutoTokenizer.from_pretrained(str(out)), weights(out)
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(str(zoo / "rev")).get_vocab()
    assert merged[HEAD].shape[0] == len(tokenizer)
    both = (row(zoo, "add", "<both>", HEAD) + row(zoo, "rev", "<both>", HEAD)) / 2
    torch.testing.assert_close(merged[HEAD][tokenizer.convert_tokens_to_ids("<both>")], both, rtol=0, atol=1e-7)
    assert "1 token(s) added by experts are dropped with their embedding rows (<a>)" in caplog.text


def test_reordered_vocabulary_is_refused_naming_the_first_differing_token(zoo, tmp_path):
    import shutil

    shutil.copytree(zoo / "rev", tmp_path / "rev")
    reorder_vocabulary(tmp_path / "rev", "a", "b")
    with pytest.raises(AdamergeError) as refused:
        ExpertPool(str(zoo / "base"), {"add": str(zoo / "add"), "rev": str(tmp_path / "rev")})
    message = str(refused.value)
    assert "\n" not in message
    assert "expert 'rev'" in message and "'b' at id" in message and "the base has 'a'" in message


def reorder_vocabulary(directory: Path, first: str, second: str) -> None:
    """Swap two tokens' ids in a saved tokenizer.json (the same strings, another order)."""
    path = directory / "tokenizer.json"
    data = json.loads(path.read_text())
    vocab = data["model"]["vocab"]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    path.write_text(json.dumps(data))


def test_extra_rows_need_the_experts_tokenizer(zoo, tmp_path):
    """In memory (no files to read a tokenizer from) and on disk (no tokenizer files): one line each."""
    from transformers import AutoModelForCausalLM

    grown = AutoModelForCausalLM.from_pretrained(str(zoo / "add"))
    with pytest.raises(AdamergeError, match=r"expert 'add': 'model.embed_tokens.weight' has 46 rows, the base 44"):
        ExpertPool(str(zoo / "base"), {"add": grown, "rev": str(zoo / "rev")}).task_vectors()
    grown.save_pretrained(tmp_path / "bare")
    with pytest.raises(AdamergeError, match=r"expert 'add': 46 rows where the base has 44 .* tokenizer files.*"
                                            r"pool.tokenizer=base to drop them"):
        ExpertPool(str(zoo / "base"), {"add": str(tmp_path / "bare")})
    dropped = ExpertPool(str(zoo / "base"), {"add": str(tmp_path / "bare")}, tokenizer="base").task_vectors()
    assert dropped.added is None and dropped.stacks[EMBED].shape == (1, len(char_tokenizer()), 32)


def test_a_lora_output_is_refused_before_training(zoo, tmp_path):
    with pytest.raises(AdamergeError, match=r"output.format=lora\|both cannot hold the rows of tokens the experts"):
        merge(zoo, tmp_path / "lora", output={"format": "lora", "rank": 4})
    assert not (tmp_path / "lora").exists()


def test_tied_embeddings_grow_once(tmp_path):
    """A tied lm_head is the input embedding: one vocabulary tensor, still tied after the fold."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from adamerge.granularity import Task
    from adamerge.merged import MergedModel

    config = tiny_llama().config.to_dict()
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**{**config, "tie_word_embeddings": True})).eval()
    base.save_pretrained(tmp_path / "base")
    char_tokenizer().save_pretrained(tmp_path / "base")
    expert_with_tokens(base, 0, ["<t>"], tmp_path / "e")
    pool = ExpertPool(str(tmp_path / "base"), {"e": str(tmp_path / "e")})
    assert pool.vocab_names == [EMBED]
    folded = MergedModel(pool.base, pool.task_vectors(), Task(init=1.0)).fold()
    assert folded.get_output_embeddings().weight is folded.get_input_embeddings().weight
    assert torch.equal(folded.get_input_embeddings().weight, weights(tmp_path / "e")[EMBED])  # c = 1: the expert
    assert folded.config.vocab_size == len(char_tokenizer()) + 1


def test_an_experts_tokenizer_whose_added_token_has_no_row(zoo, tmp_path, caplog):
    """pool.tokenizer=NAME takes that expert's tokenizer as it is; a token of it no expert has a row for
    gets a zero row (warned), so every id of the written tokenizer has a row."""
    from adamerge.granularity import Task
    from adamerge.merged import MergedModel

    tiny_expert(tiny_llama(), 0).save_pretrained(tmp_path / "e")
    tokenizer = char_tokenizer()
    tokenizer.add_tokens(["<tool>"])
    tokenizer.save_pretrained(tmp_path / "e")
    with caplog.at_level(logging.WARNING):
        pool = ExpertPool(str(zoo / "base"), {"e": str(tmp_path / "e")}, tokenizer="e")
        folded = MergedModel(pool.base, pool.task_vectors(), Task(init=1.0)).fold()
    assert "have no embedding row in it (<tool>)" in caplog.text and "their rows are zero" in caplog.text
    assert pool.vocabulary.merged_tokenizer().get_vocab() == tokenizer.get_vocab()
    assert folded.config.vocab_size == len(tokenizer)
    assert not folded.get_input_embeddings().weight[-1].any() and not folded.get_output_embeddings().weight[-1].any()
    with pytest.raises(AdamergeError, match=r"pool.tokenizer='x' must be base, union or an expert's name \(e\)"):
        ExpertPool(str(zoo / "base"), {"e": str(tmp_path / "e")}, tokenizer="x")


def test_a_hub_expert_with_added_tokens(zoo, tmp_path, monkeypatch):
    """An expert given by hub id (here from an offline cache): its tokenizer is read once its rows outnumber
    the base's."""
    import shutil

    import huggingface_hub.constants

    sha = "0" * 40
    repo = tmp_path / "hub" / "models--org--rev"
    shutil.copytree(zoo / "rev", repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    pool = ExpertPool(str(zoo / "base"), {"add": str(zoo / "add"), "rev": "org/rev"})
    assert list(pool.vocabulary.tokenizers) == ["add"]  # the hub expert's is not read before it is needed
    added = pool.task_vectors().added
    assert list(pool.vocabulary.tokenizers) == ["add", "rev"]
    assert [pool.vocabulary.merged_tokenizer().convert_ids_to_tokens(i) for i in added.ids] == ["<a>", "<both>", "<b>"]
    assert torch.equal(added.rows[HEAD][2], row(zoo, "rev", "<b>", HEAD))
