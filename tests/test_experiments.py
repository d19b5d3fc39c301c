"""The papers' setups compose and run end to end on tiny random stand-ins of the same classes:
only the download differs (pool and data sources are overridden with local copies)."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from transformers import AutoModelForCausalLM, MistralConfig, MistralForCausalLM

from adamerge.zoo.tokenizer import char_tokenizer

EXPERTS = ("math", "code", "instruct")
COLUMNS = {"math": "question", "code": "instruction", "instruct": "instruction"}


@pytest.fixture(scope="module")
def local_llm_experts(tmp_path_factory) -> Path:
    """A tiny bf16 Mistral base, three perturbed experts and a `datasets` directory per task."""
    from datasets import Dataset

    root = tmp_path_factory.mktemp("llm_experts")
    tok = char_tokenizer()
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                           pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    base = MistralForCausalLM(config).to(torch.bfloat16)
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    for name in EXPERTS:
        expert = copy.deepcopy(base)
        with torch.no_grad():
            for p in expert.parameters():
                p.add_(0.02 * torch.randn_like(p))
        expert.save_pretrained(root / name)
        Dataset.from_dict({COLUMNS[name]: [f"{name} prompt {i}" for i in range(4)]}).save_to_disk(root / f"{name}_ds")
    return root


@pytest.mark.parametrize("experiment", ["llm_experts_align", "llm_experts_dam"])
def test_experiment_composes_with_hub_sources(experiment):
    with initialize_config_module("adamerge.conf", version_base=None):
        cfg = compose("config", overrides=[f"+experiment={experiment}"])
    assert set(cfg.pool.experts) == set(EXPERTS) and "/" in cfg.pool.base
    assert set(cfg.data.paths) == set(EXPERTS) and cfg.data.paths.math.dataset == "openai/gsm8k"
    expected = {"llm_experts_align": ("layer", "align", "sigmoid"), "llm_experts_dam": ("column", "dam", "identity")}
    assert (cfg.granularity.name, cfg.objective.name, cfg.granularity.transform) == expected[experiment]


@pytest.mark.parametrize("experiment", ["llm_experts_align", "llm_experts_dam"])
def test_experiment_runs_on_local_stand_ins(experiment, local_llm_experts, tmp_path):
    root = local_llm_experts
    overrides = [f"+experiment={experiment}", f"pool.base={root / 'base'}", "logger=none", "trainer.max_steps=2",
                 "objective.new_tokens=3", f"output_dir={tmp_path / 'out'}", "trainer.enable_progress_bar=false",
                 f"hydra.run.dir={tmp_path / 'run'}"]
    for name in EXPERTS:
        overrides += [f"pool.experts.{name}={root / name}",
                      f"data.paths.{name}={{dataset:{root / (name + '_ds')},split:train,"
                      f"columns:{{{COLUMNS[name]}:prompt}}}}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "adamerge", *overrides], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    folded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert folded.dtype == torch.bfloat16
    assert "base_model_relation: merge" in (tmp_path / "out" / "README.md").read_text()
