"""The model card: ``base_model`` only for a hub id, the method with its paper, a coefficient summary."""

from __future__ import annotations

import pytest
import torch
import yaml

from adamerge.card import coefficient_summary, hub_id, method_name, model_card


def front_matter(card: str) -> dict:
    return yaml.safe_load(card.split("---\n")[1])


@pytest.mark.parametrize(("given", "published"), [
    ("meta-llama/Llama-3.2-1B", "meta-llama/Llama-3.2-1B"),
    ("gpt2", "gpt2"),
    ("./experts/base", None),
    ("/abs/path/base", None),
    ("~/models/base", None),
    (None, None),
])
def test_base_model_is_the_hub_id_the_user_gave(given, published):
    card = model_card(given, {"math": "org/math"}, {})
    assert front_matter(card).get("base_model") == published
    assert front_matter(card)["base_model_relation"] == "merge"


def test_an_existing_relative_directory_is_not_a_hub_id(tmp_path, monkeypatch):
    (tmp_path / "org" / "base").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert hub_id("org/base") is None and hub_id("org/elsewhere") == "org/elsewhere"


@pytest.mark.parametrize(("config", "method"), [
    ({"granularity": {"name": "task", "init": 0.3}, "trainer": {"max_steps": 0}}, "Task arithmetic"),
    ({"granularity": {"name": "task", "init": "uniform"}, "trainer": {"max_steps": 0}}, "Simple average"),
    ({"granularity": {"name": "task"}, "pool": {"preprocess": {"method": "ties"}}, "trainer": {"max_steps": 0}},
     "TIES-Merging"),
    ({"granularity": {"name": "layer"}, "objective": {"name": "entropy"}, "trainer": {"max_steps": 500}},
     "AdaMerging"),
    ({"granularity": {"name": "layer"}, "objective": {"name": "entropy"}, "pool": {"preprocess": {"method": "ties"}},
      "trainer": {"max_steps": 500}}, "AdaMerging++"),
    ({"granularity": {"name": "chunk", "budget": 64}, "objective": {"name": "align"}, "trainer": {"max_steps": 9}},
     "Expert Merging++"),
    ({"granularity": {"name": "column"}, "objective": {"name": "dam"}, "trainer": {"max_steps": 9}}, "DAM"),
    ({"granularity": {"name": "layer"}, "objective": {"name": "projected"}, "trainer": {"max_steps": 9}}, "DOGE"),
    ({"granularity": {"name": "task", "mask": {"steps": 40}}, "objective": {"name": "entropy"},
      "trainer": {"max_steps": 40}}, "Concrete task arithmetic"),
    ({"granularity": {"name": "layer", "mask": {"steps": 40}}, "objective": {"name": "entropy"},
      "trainer": {"max_steps": 80}}, "Concrete AdaMerging"),
    ({"granularity": {"name": "layer", "mask": "shared"}, "objective": {"name": "entropy"},
      "trainer": {"max_steps": 9}}, "Concrete AdaMerging"),
])
def test_method_is_named_from_the_config(config, method):
    assert method_name(config) == method


def test_card_summarizes_the_learned_coefficients():
    experts = ["math", "code"]
    table = {"model.layers.0.mlp.weight": torch.tensor([[0.3], [0.3]]),       # did not move
             "model.layers.1.mlp.weight": torch.tensor([[0.9], [0.1]]),       # moved most
             "lm_head.weight": torch.tensor([[0.5], [0.3]]),
             "delta.lm_head.weight": torch.ones(2, 4)}                       # DOGE's deltas are no coefficients
    config = {"granularity": {"name": "layer", "init": 0.3}, "objective": {"name": "entropy"},
              "trainer": {"max_steps": 10}}
    card = model_card("org/base", dict.fromkeys(experts, "somewhere"), {}, None, table, config)
    assert "Method: **AdaMerging** ([paper](https://arxiv.org/abs/2310.02575))" in card
    assert "| math | 0.5667 | 0.3000 | 0.9000 |" in card and "| code | 0.2333 | 0.1000 | 0.3000 |" in card
    moved = card[card.index("moved most"):]
    assert moved.index("model.layers.1.mlp.weight") < moved.index("lm_head.weight")
    assert "model.layers.0.mlp.weight" not in moved  # unchanged coefficients are not listed
    assert "delta." not in card
    assert coefficient_summary({}, experts) == []
