"""Model kinship (adamerge/kinship.py): cosine and sign agreement per pair of experts, overall and per layer,
streamed from safetensors or read through the pool, printed by ``python -m adamerge inspect`` and in the card."""

from __future__ import annotations

import math

import pytest
import torch

from adamerge.card import model_card
from adamerge.kinship import CARD_ENTRIES, evenly_spaced, kinship, layer_of, main, markdown, stacks_of


def test_cosine_and_sign_agreement_by_hand():
    a = torch.tensor([[1.0, -2.0], [0.0, 3.0]])
    b = torch.tensor([[2.0, 2.0], [5.0, 0.0]])
    c = -a
    result = kinship(["a", "b", "c"], [("model.layers.0.w", torch.stack([a, b, c])),
                                        ("model.layers.1.w", torch.stack([a, a, a]))])
    both = torch.cat([a.flatten(), a.flatten()]), torch.cat([b.flatten(), a.flatten()])
    assert math.isclose(result.overall[(0, 1)].cosine, float(torch.nn.functional.cosine_similarity(*both, 0)),
                        rel_tol=1e-6)
    assert result.layers["model.layers.0"][(0, 1)].sign_agreement == 1 / 2  # both change 2 entries, 1 agrees
    assert result.layers["model.layers.0"][(0, 2)].cosine == pytest.approx(-1.0)
    assert result.overall[(0, 2)].sign_agreement == 3 / 6
    rows = markdown(result, shown=1)
    assert rows[2].startswith("| a / b |") and "`model.layers.0` (-1.000, 0.0%)" in rows[3]
    untouched = kinship(["a", "b"], [("x.w", torch.stack([a, torch.zeros(2, 2)]))])
    assert markdown(untouched)[2] == "| a / b | 0.000, n/a |  |"


def test_layers_group_the_tensors_of_one_block():
    assert layer_of("model.layers.12.mlp.up_proj.weight") == "model.layers.12"
    assert layer_of("transformer.h.0.attn.c_attn.bias") == "transformer.h.0"
    assert layer_of("lm_head.weight") == "lm_head.weight"


@pytest.fixture(scope="module")
def saved(llama_family, tmp_path_factory):
    return llama_family.save(tmp_path_factory.mktemp("kinship"))


def test_streamed_from_safetensors_equals_the_pool(llama_family, saved):
    base_dir, dirs = saved
    experts, streamed = stacks_of({"base": str(base_dir), "experts": {k: str(v) for k, v in dirs.items()}})
    from_files = kinship(experts, streamed)
    _, tv = llama_family.pooled
    from_pool = kinship(tv.experts, ((n, tv.stacks[n]) for n in tv.names))
    for pair in from_pool.pairs:
        assert from_files.overall[pair].cosine == pytest.approx(from_pool.overall[pair].cosine, abs=1e-6)
        assert from_files.overall[pair].both == from_pool.overall[pair].both
    assert set(from_files.layers) == set(from_pool.layers)


def test_inspect_command_prints_every_pair(saved, capsys):
    base_dir, dirs = saved
    args = [f"pool.base={base_dir}", *(f"pool.experts.{k}={v}" for k, v in dirs.items())]
    assert main([*args, "--layers", "2"]) == 0
    out = capsys.readouterr().out
    assert "Kinship of 3 experts" in out and "| math / code |" in out and "| code / chat |" in out
    assert main([f"pool.base={base_dir}", f"pool.experts.math={dirs['math']}"]) == 2
    assert "at least two pool.experts" in capsys.readouterr().err


def test_card_carries_the_kinship_table():
    card = model_card(None, {"a": "x", "b": "y"}, {}, kinship=["| experts | cosine, sign agreement |", "|---|---|",
                                                          "| a / b | 0.1, 50% |"])
    assert "## Kinship of the experts" in card and "| a / b | 0.1, 50% |" in card


def test_the_cards_sample_estimates_the_whole_tensor():
    """The model card reads at most CARD_ENTRIES evenly spaced entries per tensor; on a large stack of
    correlated task vectors its cosines and sign agreements stay close to those of every entry."""
    gen = torch.Generator().manual_seed(0)
    shared = torch.randn(512, 512, generator=gen)
    stack = torch.stack([shared + torch.randn(512, 512, generator=gen) * s for s in (0.5, 1.0, 2.0)])
    whole = kinship(["a", "b", "c"], [("w", stack)]).overall
    sample = evenly_spaced(stack, CARD_ENTRIES)
    assert sample.shape[1] <= CARD_ENTRIES < stack[0].numel()
    estimate = kinship(["a", "b", "c"], [("w", sample)]).overall
    for pair, stats in whole.items():
        assert estimate[pair].cosine == pytest.approx(stats.cosine, abs=0.01)
        assert estimate[pair].sign_agreement == pytest.approx(stats.sign_agreement, abs=0.01)
