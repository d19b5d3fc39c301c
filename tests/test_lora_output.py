"""The merge as a PEFT LoRA adapter (``output.format=lora|both``): exact for LoRA experts (peft loads it and
gives the merged model's outputs), an SVD truncation with the errors the SVD itself predicts otherwise."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import output_of, save_lora_adapter
from test_lora_factors import save_adapter

from adamerge import Chunk, Column, ExpertPool, Layer, MergedModel
from adamerge.errors import AdamergeError
from adamerge.objectives import OBJECTIVES
from adamerge.run import run
from adamerge.writing import RunResult, write_output

# math: conftest's adapter (q_proj, v_proj; r=4); code: r=2 with an Embedding LoRA; chat: r=3 with
# lm_head in modules_to_save (a dense delta, stored whole)
ADAPTERS = {"code": (2, ["q_proj", "o_proj", "embed_tokens"], {}),
            "chat": (3, ["v_proj", "down_proj"], {"modules_to_save": ["lm_head"]})}
GRANULARITIES = {
    "layer": lambda: Layer(init=0.3),
    "column": lambda: Column(init=0.3),
    "row chunks": lambda: Chunk(init=0.3, chunks={"*": 4}, chunking="rows"),
}


@pytest.fixture(scope="module")
def lora_dirs(llama_family, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_out")
    base_dir = root / "base"
    llama_family.base().save_pretrained(base_dir)
    dirs = {"math": root / "math"}
    save_lora_adapter(llama_family.base(), dirs["math"])
    for seed, (name, (rank, targets, options)) in enumerate(ADAPTERS.items()):
        dirs[name] = root / name
        save_adapter(llama_family.base(), dirs[name], seed, rank, targets, **options)
    return base_dir, dirs


def random_merge(pool: ExpertPool, granularity, seed: int = 0) -> MergedModel:
    merged = MergedModel(pool.base, pool.task_vectors(), granularity)
    gen = torch.Generator().manual_seed(seed)
    merged.granularity.load_table({k: 0.3 + 0.3 * torch.rand(v.shape, generator=gen)
                                   for k, v in merged.granularity.table().items()})
    return merged


def write(merged: MergedModel, pool: ExpertPool, out, fmt: str, rank: int | None = None) -> None:
    config = {"pool": {}, "granularity": {"name": "layer"}, "objective": {"name": "entropy"},
              "output": {"format": fmt, "rank": rank}}
    write_output(merged, pool, OBJECTIVES["entropy"](), config, RunResult(out, coefficients=merged.granularity.table()))


def peft_output(base, directory, inputs) -> torch.Tensor:
    from peft import PeftModel

    return output_of(PeftModel.from_pretrained(base, str(directory)).eval(), inputs)


@pytest.mark.parametrize("granularity", list(GRANULARITIES))
def test_lora_experts_give_an_exact_adapter_of_rank_sum(llama_family, lora_dirs, tmp_path, granularity):
    from transformers import AutoModelForCausalLM

    base_dir, dirs = lora_dirs
    pool = ExpertPool(str(base_dir), {k: str(v) for k, v in dirs.items()})
    merged = random_merge(pool, GRANULARITIES[granularity]())
    out = tmp_path / "out"
    write(merged, pool, out, "both")
    expected = output_of(merged, llama_family.inputs)
    got = peft_output(AutoModelForCausalLM.from_pretrained(base_dir), out / "adapter", llama_family.inputs)
    assert (got - expected).abs().max().item() <= 1e-5
    full = output_of(AutoModelForCausalLM.from_pretrained(out), llama_family.inputs)
    assert (full - expected).abs().max().item() <= 1e-5
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    ranks = {**{m: config["r"] for m in config["target_modules"]}, **config["rank_pattern"]}
    assert ranks["model.layers.0.self_attn.q_proj"] == 4 + 2 and ranks["model.layers.1.self_attn.v_proj"] == 4 + 3
    assert ranks["model.embed_tokens"] == 2 and ranks["model.layers.0.mlp.down_proj"] == 3
    assert config["alpha_pattern"] == config["rank_pattern"] and config["lora_alpha"] == config["r"]
    assert config["modules_to_save"] == ["lm_head"]
    report = json.loads((out / "adapter" / "adapter_report.json").read_text())
    assert report["overall_relative_error"] == 0 and report["dropped"] == []


def svd_errors(merged: MergedModel, rank: int) -> dict[str, float]:
    """The relative Frobenius error of the best rank-``rank`` approximation of each merged delta, from its singular
    values (independent of the factor path)."""
    folded, base = dict(merged.fold().named_parameters()), dict(merged.base.named_parameters())
    errors = {}
    for name in (n for n in merged.names if base[n].dim() == 2):
        s = torch.linalg.svdvals((folded[name] - base[name]).double())
        errors[name] = (s[rank:].square().sum() / s.square().sum()).sqrt().item()
    return errors


def test_a_lora_adapter_compressed_by_svd_reports_the_truncation_error(llama_family, lora_dirs, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir, dirs = lora_dirs
    pool = ExpertPool(str(base_dir), {k: str(v) for k, v in dirs.items()})
    merged = random_merge(pool, Layer(init=0.3), seed=1)
    out = tmp_path / "out"
    write(merged, pool, out, "lora", rank=3)
    assert not (out / "model.safetensors").exists() and (out / "adapter_model.safetensors").exists()
    report = json.loads((out / "adapter_report.json").read_text())
    expected = svd_errors(merged, 3)
    lora_tensors = [n for n in report["relative_error"] if n != "lm_head.weight"]
    assert max(abs(report["relative_error"][n] - expected[n]) for n in lora_tensors) < 1e-5
    assert report["relative_error"]["model.layers.0.self_attn.q_proj.weight"] > 0.01  # rank 6 -> 3 loses something
    assert report["relative_error"]["lm_head.weight"] == 0  # stored whole
    assert 0 < report["overall_relative_error"] < 1
    folded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(out)).merge_and_unload()
    name = "model.layers.0.self_attn.q_proj.weight"
    delta = (folded.get_parameter(name) - merged.base.get_parameter(name)).double()
    true = (merged.fold().get_parameter(name) - merged.base.get_parameter(name)).double()
    u, s, vh = torch.linalg.svd(true)
    assert torch.allclose(delta, (u[:, :3] * s[:3]) @ vh[:3], atol=1e-6)  # the best rank-3 approximation
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["library_name"] == "peft" and "lora" in front["tags"]
    assert "## LoRA adapter" in card and f"{report['overall_relative_error']:.3g}" in card


def test_full_experts_need_a_rank_and_give_the_svd_adapter(llama_family, tmp_path):
    pool = llama_family.pool()
    merged = random_merge(pool, Layer(init=0.3))
    with pytest.raises(AdamergeError, match=r"needs output.rank=R here: the merged delta of '.*' is not exactly"):
        write(merged, pool, tmp_path / "refused", "lora")
    assert not (tmp_path / "refused").exists()
    write(merged, pool, tmp_path / "r4", "lora", rank=4)
    report = json.loads((tmp_path / "r4" / "adapter_report.json").read_text())
    expected = svd_errors(merged, 4)
    assert max(abs(report["relative_error"][n] - e) for n, e in expected.items()) < 1e-5
    norms = [n for n in merged.names if "norm" in n]
    assert norms and all(n.rpartition(".")[0] in report["modules_to_save"] for n in norms)
    # rank 32 is every matrix's full rank here: the adapter is then the merge itself
    write(merged, pool, tmp_path / "r32", "lora", rank=32)
    got = peft_output(llama_family.base(), tmp_path / "r32", llama_family.inputs)
    assert (got - output_of(merged, llama_family.inputs)).abs().max().item() <= 1e-4


def test_a_run_refuses_an_inexact_adapter_before_training_and_bad_options_before_loading(llama_family, tmp_path,
                                                                                          tokenizer_factory):
    base_dir, dirs = llama_family.save(tmp_path / "models")
    tokenizer_factory(base_dir)
    config = {"pool": {"base": str(base_dir), "experts": {k: str(v) for k, v in dirs.items()}},
              "granularity": {"name": "task", "init": 0.3}, "objective": {"name": "entropy"},
              "trainer": {"max_steps": 0}, "output_dir": str(tmp_path / "out"), "output": {"format": "lora"}}
    with pytest.raises(AdamergeError, match=r"output.format=lora needs output.rank=R"):
        run(config, tmp_path / "run")
    assert not (tmp_path / "out").exists()
    for output, message in [({"format": "adapter"}, r"output.format='adapter'; choose from full, lora, both"),
                            ({"format": "lora", "rank": 0}, r"output.rank=0 must be a positive integer or null"),
                            ({"rnk": 4}, r"unknown key output.rnk")]:
        with pytest.raises(AdamergeError, match=message):
            run({**config, "pool": {"base": str(tmp_path / "missing"), "experts": {"a": "./a"}}, "output": output},
                tmp_path / "run")


def test_gpt2_conv1d_biases_and_a_tied_head_at_full_rank_give_the_merge_itself(gpt2_family, tmp_path):
    """Conv1D matrices (stored transposed), changed biases (peft's lora_bias, which moves the Embeddings to
    modules_to_save) and the output head tied to the input embeddings (stored with them)."""
    pool = gpt2_family.pool()
    merged = random_merge(pool, Layer(init=0.3))
    write(merged, pool, tmp_path / "out", "lora", rank=32)  # every GPT-2 matrix here has rank <= 32
    report = json.loads((tmp_path / "out" / "adapter_report.json").read_text())
    assert report["dropped"] == [] and report["overall_relative_error"] < 1e-6
    assert "transformer.h.0.attn.c_attn" in report["lora_bias"]
    assert {"transformer.wte", "lm_head"} <= set(report["modules_to_save"])
    got = peft_output(gpt2_family.base(), tmp_path / "out", gpt2_family.inputs)
    assert (got - output_of(merged, gpt2_family.inputs)).abs().max().item() <= 1e-4
