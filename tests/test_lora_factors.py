"""LoRA experts in factor space: never densified, yet the same merge, gradients and fold as the dense
fp32 path built from peft's own ``merge_and_unload``; dense fallbacks where factors cannot serve."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from conftest import output_of
from test_engine_options import coefficient_grads
from torch.utils._python_dispatch import TorchDispatchMode

from adamerge import Chunk, Column, ExpertPool, Layer, MergedModel, Task
from adamerge.granularity import Granularity, _singleton_view
from adamerge.loading import apply_preprocess

GRANULARITIES = {
    "task": lambda: Task(init=0.3),
    "layer": lambda: Layer(init=0.3),
    "column": lambda: Column(init=0.3),
    "chunk": lambda: Chunk(init=0.3, chunks={"*.weight": 4}),
}
# expert -> (rank, target modules, extra LoraConfig options): different ranks, an Embedding LoRA,
# one adapter with modules_to_save (dense task vector for lm_head, factors elsewhere)
LLAMA_ADAPTERS = {
    "math": (2, ["q_proj", "v_proj"], {}),
    "code": (4, ["q_proj", "o_proj", "embed_tokens"], {}),
    "chat": (3, ["v_proj", "down_proj"], {"modules_to_save": ["lm_head"]}),
}


def save_adapter(base, directory, seed: int, rank: int, targets: list[str], **options):
    """Save a LoRA adapter with every adapter tensor random; returns peft's merge_and_unload of it."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, lora_dropout=0.0, **options)
    model = get_peft_model(copy.deepcopy(base), config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(directory)
    return copy.deepcopy(model).merge_and_unload().eval()


def lora_pools(family, root, adapters, **pool_options):
    """(pool of adapter directories, pool of peft-merged expert models) on the same base."""
    dirs, merged = {}, {}
    for seed, (name, (rank, targets, options)) in enumerate(adapters.items()):
        dirs[name] = root / name
        merged[name] = save_adapter(family.base(), dirs[name], seed, rank, targets, **options)
    return (ExpertPool(family.base(), dirs, auto_class=family.auto_class, **pool_options),
            ExpertPool(family.base(), merged, auto_class=family.auto_class, **pool_options))


@pytest.fixture(scope="module")
def llama_lora(llama_family, tmp_path_factory):
    factor_pool, dense_pool = lora_pools(llama_family, tmp_path_factory.mktemp("lora"), LLAMA_ADAPTERS)
    return factor_pool, factor_pool.task_vectors(), dense_pool, dense_pool.task_vectors()


def shared_table(factor: MergedModel, dense: MergedModel, seed: int = 0) -> None:
    """Random coefficients for the factor model's groups, the same ones in the dense model."""
    gen = torch.Generator().manual_seed(seed)
    table = {k: 0.3 + 0.2 * torch.randn(v.shape, generator=gen) for k, v in factor.granularity.table().items()}
    factor.granularity.load_table(table)
    dense.granularity.load_table(table)


def test_lora_task_vectors_stay_factors(llama_lora):
    _, tv, _, dense = llama_lora
    assert list(tv.stacks) == ["lm_head.weight"]  # modules_to_save: a dense delta, the only stack
    targeted = {n for n in dense.stacks if any(t in n for t in ("q_proj", "v_proj", "o_proj", "down_proj", "embed"))}
    assert set(tv.factors) == targeted
    owners = tv.factors["model.layers.0.self_attn.q_proj.weight"].owner.tolist()
    assert owners == [0, 0, 1, 1, 1, 1]  # math r=2, code r=4; chat has no q_proj LoRA
    for name, factors in tv.factors.items():
        torch.testing.assert_close(factors.dense(), dense.stacks[name], rtol=0, atol=1e-6)
    torch.testing.assert_close(tv.norms(), dense.norms(), rtol=1e-5, atol=0)
    held = sum(s.numel() for s in tv.stacks.values()) + sum(
        f.left.numel() + f.right.numel() for f in tv.factors.values())
    assert held < 0.15 * sum(s.numel() for s in dense.stacks.values())  # K dense models' worth, else


class MatmulOutputs(TorchDispatchMode):
    """Shapes of every matmul result computed while active."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm):
            self.shapes.append(tuple(out.shape))
        return out


def test_no_dense_delta_of_an_expert_is_built(llama_lora):
    pool, tv, _, _ = llama_lora
    targeted = {tuple(f.left.shape[:1] + f.right.shape[1:]) for f in tv.factors.values()}
    with MatmulOutputs() as building:
        pool.task_vectors()
    assert not targeted & set(building.shapes)  # loading keeps factors: no B_k A_k is ever formed
    merged = MergedModel(pool.base, tv, Task(init=0.3))
    with MatmulOutputs() as merging:
        merged.merged_weights()
    assert sum(shape in targeted for shape in merging.shapes) == len(tv.factors)  # one per tensor, not K


@pytest.mark.parametrize("granularity", list(GRANULARITIES))
def test_factor_merge_matches_peft_dense(llama_family, llama_lora, granularity):
    pool, tv, dense_pool, dense_tv = llama_lora
    factor = MergedModel(pool.base, tv, GRANULARITIES[granularity]())
    dense = MergedModel(dense_pool.base, dense_tv, GRANULARITIES[granularity]())
    shared_table(factor, dense)
    inputs = llama_family.inputs
    assert (output_of(factor, inputs) - output_of(dense, inputs)).abs().max() <= 1e-5
    assert (output_of(factor, inputs) - output_of(pool.base, inputs)).abs().max() > 1e-2  # the merge did something
    g_factor = coefficient_grads(factor, inputs)
    coefficient_grads(dense, inputs)  # the dense model has more groups (every tensor): compare the shared ones
    g_dense = torch.cat([dense.granularity.raw[k].grad.flatten() for k in factor.granularity.raw])
    torch.testing.assert_close(g_factor, g_dense, rtol=1e-4, atol=1e-5 * g_dense.abs().max().item())
    folded, reference = factor.fold(), dense.fold()
    for name, p in folded.named_parameters():
        torch.testing.assert_close(p, reference.get_parameter(name), rtol=0, atol=1e-6)
    assert (output_of(folded, inputs) - output_of(factor, inputs)).abs().max() <= 1e-5


def test_factor_teacher_mode_is_the_peft_expert(llama_family, llama_lora):
    pool, tv, dense_pool, _ = llama_lora
    factor = MergedModel(pool.base, tv, Layer(init=0.3))
    for k, expert in enumerate(dense_pool.expert_sources.values()):
        with factor.as_expert(k):
            assert (output_of(factor, llama_family.inputs) - output_of(expert, llama_family.inputs)).abs().max() <= 1e-5


def test_conv1d_lora_and_bf16_factors(gpt2_family, tmp_path):
    """GPT-2's Conv1D stores (in, out): peft's fan_in_fan_out transposes the factors."""
    adapters = {f"e{k}": (2 + k, ["c_attn", "c_fc"], {"fan_in_fan_out": True}) for k in range(2)}
    pool, dense_pool = lora_pools(gpt2_family, tmp_path, adapters)
    tv = pool.task_vectors()
    assert not tv.stacks and set(tv.factors) == {f"transformer.h.{i}.{m}.weight" for i in (0, 1) for m in
                                                 ("attn.c_attn", "mlp.c_fc")}
    dense = MergedModel(dense_pool.base, dense_pool.task_vectors(), Column())
    for tvs, atol in ((tv, 1e-5), (tv.to(dtype=torch.bfloat16), 2e-2)):
        factor = MergedModel(pool.base, tvs, Column())
        shared_table(factor, dense, seed=1)
        assert (output_of(factor, gpt2_family.inputs) - output_of(dense, gpt2_family.inputs)).abs().max() <= atol


class Elementwise(Granularity):
    """One coefficient per entry: varies along both axes, which no LoRA factor can carry."""

    def count(self, info):
        return int(torch.Size(info.shape).numel())

    def expand(self, coef, info):
        if len(info.shape) == 2:
            return coef.reshape(coef.shape[0], *info.shape)
        return _singleton_view(coef[:, :1], len(info.shape), None)


def test_dense_fallbacks_say_why(llama_family, llama_lora, tmp_path, caplog):
    pool, tv, _, dense_tv = llama_lora
    with caplog.at_level(logging.INFO, logger="adamerge"):
        ties = apply_preprocess(tv, {"method": "ties", "density": 0.5})
        assert "preprocessing works on dense values" in caplog.text and not ties.factors
        merged = MergedModel(pool.base, tv, Elementwise(init=0.3))
        assert "Elementwise's coefficients vary along both axes" in caplog.text and not len(merged.lora)
        torch.testing.assert_close(merged.stack("model.layers.0.self_attn.q_proj.weight"),
                                   dense_tv.stacks["model.layers.0.self_attn.q_proj.weight"], rtol=0, atol=1e-6)
        caplog.clear()
        adapters = {"lora": tmp_path / "lora", "full": llama_family.expert(0)}
        save_adapter(llama_family.base(), adapters["lora"], 0, 2, ["q_proj"])
        mixed = ExpertPool(llama_family.base(), adapters).task_vectors()
        assert "full experts change them too" in caplog.text and not mixed.factors
        save_adapter(llama_family.base(), tmp_path / "dora", 0, 2, ["q_proj"], use_dora=True)
        dora = ExpertPool(llama_family.base(), {"dora": tmp_path / "dora"}).task_vectors()
        assert "cannot stay factors" in caplog.text and not dora.factors


def test_lora_experts_offloaded_run_teacher_cache_and_refold(tmp_path):
    """``run`` with LoRA experts and ``pool.offload=cpu``: align caches its teachers (teacher mode),
    trains, folds (checked against the wrapped model) and ``adamerge fold`` writes the same weights."""
    from safetensors.torch import load_file
    from tiny import assert_refold_writes_the_same, main, write_zoo
    from transformers import AutoModelForCausalLM


    zoo = write_zoo(tmp_path / "zoo")
    base = AutoModelForCausalLM.from_pretrained(zoo.base)
    overrides = [f"pool.base={zoo.base}", "pool.offload=cpu", "granularity=layer", "objective=align",
                 "trainer.max_steps=2", "trainer.accelerator=cpu", "trainer.enable_checkpointing=false",
                 "trainer.enable_progress_bar=false", "logger=none", f"output_dir={tmp_path / 'out'}"]
    for k, task in enumerate(zoo.experts):
        save_adapter(base, tmp_path / task, k, 2 + k, ["q_proj", "v_proj"], modules_to_save=["lm_head"])
        overrides += [f"pool.experts.{task}={tmp_path / task}", f"data.paths.{task}={zoo.data[task]}"]
    main([str(tmp_path / "run"), *overrides])
    card = (tmp_path / "out" / "README.md").read_text()
    assert float(card.split("fold max |diff| (logits): `")[1].split("`")[0]) <= 1e-5  # folded == wrapped
    folded = load_file(tmp_path / "out" / "model.safetensors")
    assert not torch.equal(folded["model.layers.0.self_attn.q_proj.weight"],
                           base.get_parameter("model.layers.0.self_attn.q_proj.weight"))
    assert_refold_writes_the_same(tmp_path / "out", tmp_path / "again")
