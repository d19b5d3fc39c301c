"""ExpertPool: sources (modules, builders, HF directories, LoRA adapters), validation, selection."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import llama, output_of
from torch import nn

from adamerge import AdamergeError, ExpertPool, Layer, MergedModel
from adamerge.tensors import describe_tensor


def expected_stack(family, name: str) -> torch.Tensor:
    w0 = dict(family.base().named_parameters())[name]
    return torch.stack([dict(family.expert(k).named_parameters())[name] - w0 for k in range(3)])


def test_task_vectors_are_expert_minus_base(family):
    pool = family.pool()
    tv = pool.task_vectors()
    assert tv.experts == list(family.expert_names) == pool.expert_names
    params = dict(family.base().named_parameters())
    assert list(tv.stacks) == pool.merged_names == list(params)
    for name, stack in tv.stacks.items():
        assert stack.shape == (3, *params[name].shape)
        torch.testing.assert_close(stack, expected_stack(family, name), rtol=0, atol=0)
    assert tv.infos.keys() == tv.stacks.keys()


def test_tied_head_is_merged_once(gpt2_family):
    names = gpt2_family.pool().merged_names
    assert "transformer.wte.weight" in names
    assert "lm_head.weight" not in names


def test_tensor_kinds_follow_owning_module(gpt2_family, llama_family):
    g = {i.name: i for i in gpt2_family.pool().tensor_infos()}
    assert g["transformer.h.0.attn.c_attn.weight"].kind == "matrix"
    assert g["transformer.h.0.attn.c_attn.weight"].feature_dim == 0  # Conv1D stores (in, out)
    assert g["transformer.h.0.attn.c_attn.bias"].kind == "bias"
    assert g["transformer.h.0.ln_1.weight"].kind == "norm"
    assert g["transformer.wte.weight"].feature_dim == 1
    ll = {i.name: i for i in llama_family.pool().tensor_infos()}
    assert ll["model.layers.0.mlp.down_proj.weight"].feature_dim == 1  # nn.Linear stores (out, in)
    assert ll["model.norm.weight"].kind == "norm"
    assert describe_tensor(nn.Linear(3, 2), "bias", torch.zeros(2)).feature_dim is None


def test_hf_directories_give_the_in_memory_task_vectors(family, tmp_path):
    base_dir, dirs = family.save(tmp_path)
    from_disk = ExpertPool(base_dir, dirs, auto_class=family.auto_class)
    assert from_disk.base_source == base_dir
    disk, memory = from_disk.task_vectors(), family.pool().task_vectors()
    assert disk.stacks.keys() == memory.stacks.keys()
    for name in memory.stacks:
        torch.testing.assert_close(disk.stacks[name], memory.stacks[name], rtol=0, atol=0)


def test_sequence_classification_directories(bert_family, tmp_path):
    base_dir, dirs = bert_family.save(tmp_path)
    pool = ExpertPool(base_dir, dirs, auto_class="AutoModelForSequenceClassification")
    tv = pool.task_vectors()
    name = "bert.encoder.layer.1.output.dense.weight"
    torch.testing.assert_close(tv.stacks[name], expected_stack(bert_family, name))
    assert "classifier.weight" not in tv.stacks  # per-task heads are kept apart, not merged
    merged_too = ExpertPool(base_dir, dirs, auto_class="AutoModelForSequenceClassification", heads=()).task_vectors()
    torch.testing.assert_close(merged_too.stacks["classifier.weight"], expected_stack(bert_family, "classifier.weight"))


def test_in_memory_modules_and_builders_agree(llama_family):
    modules = {n: llama_family.expert(n) for n in llama_family.expert_names}
    a = ExpertPool(llama_family.base(), modules).task_vectors()
    b = llama_family.pool().task_vectors()
    for name in a.stacks:
        torch.testing.assert_close(a.stacks[name], b.stacks[name], rtol=0, atol=0)


def test_task_vector_dtype(llama_family):
    tv = llama_family.pool().task_vectors(dtype=torch.bfloat16)
    assert all(s.dtype == torch.bfloat16 for s in tv.stacks.values())
    assert tv.to(dtype=torch.float32).stacks["model.norm.weight"].dtype == torch.float32
    assert tv.norms().shape == (3,)


# ---- validation ------------------------------------------------------------------------------------


def test_expert_with_other_parameter_names(llama_family):
    pool = ExpertPool(llama_family.base(), {"ok": llama_family.expert(0), "short": llama(num_hidden_layers=1)})
    message = r"expert 'short' has no tensor 'model\.layers\.1\.self_attn\.q_proj\.weight'"
    with pytest.raises(AdamergeError, match=message):
        pool.task_vectors()


def test_expert_with_an_extra_tensor(llama_family):
    expert = llama_family.expert(0)
    expert.model.norm.register_parameter("extra", nn.Parameter(torch.zeros(2)))
    with pytest.raises(AdamergeError, match=r"expert 'x' has a tensor 'model\.norm\.extra'"):
        ExpertPool(llama_family.base(), {"x": expert}).task_vectors()


def test_expert_with_other_shapes(llama_family):
    message = r"expert 'wide': tensor 'model\.layers\.0\.mlp\.gate_proj\.weight' has shape \(96, 32\)"
    with pytest.raises(AdamergeError, match=message):
        ExpertPool(llama_family.base(), {"wide": llama(intermediate_size=96)}).task_vectors()


def test_expert_with_other_dtype(llama_family):
    expert = llama_family.expert(0)
    layer = expert.model.layers[1].mlp.down_proj
    layer.weight = nn.Parameter(layer.weight.detach().half())
    with pytest.raises(AdamergeError, match=r"'model\.layers\.1\.mlp\.down_proj\.weight' is torch\.float16"):
        ExpertPool(llama_family.base(), {"half": expert}).task_vectors()


def test_missing_path(llama_family, tmp_path):
    with pytest.raises(AdamergeError, match=r"expert 'gone': path .*nowhere.* does not exist"):
        ExpertPool(llama_family.base(), {"gone": tmp_path / "nowhere"}).task_vectors()
    with pytest.raises(AdamergeError, match=r"base: path .* does not exist"):
        ExpertPool(tmp_path / "nowhere", {"a": llama_family.expert(0)})


def test_directory_that_is_not_a_model(llama_family, tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(AdamergeError, match="is not a model directory"):
        ExpertPool(llama_family.base(), {"notes": tmp_path}).task_vectors()


def test_model_directory_without_weights(llama_family, tmp_path):
    llama_family.template.config.save_pretrained(tmp_path)
    with pytest.raises(AdamergeError, match=r"has no weights"):
        ExpertPool(llama_family.base(), {"empty": tmp_path}).task_vectors()


def test_zero_experts(llama_family):
    with pytest.raises(AdamergeError, match="at least one expert"):
        ExpertPool(llama_family.base(), {})


def test_pickle_weights_need_allow_pickle(llama_family, tmp_path):
    expert = llama_family.expert(1)
    expert.config.save_pretrained(tmp_path)
    torch.save(expert.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(AdamergeError, match=r"only has pickle weights \(pytorch_model\.bin\).*allow_pickle"):
        ExpertPool(llama_family.base(), {"pickled": tmp_path}).task_vectors()
    tv = ExpertPool(llama_family.base(), {"pickled": tmp_path}, allow_pickle=True).task_vectors()
    name = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(tv.stacks[name][0], expected_stack(llama_family, name)[1])


def test_bad_auto_class(llama_family):
    with pytest.raises(AdamergeError, match=r"pool\.auto_class='LlamaForCausalLM' is not a transformers Auto class"):
        ExpertPool(llama_family.base(), {"a": llama_family.expert(0)}, auto_class="LlamaForCausalLM")


# ---- include / exclude -----------------------------------------------------------------------------


def test_include_exclude_select_tensors(llama_family):
    pool = llama_family.pool(include=[r"\.mlp\."], exclude=[r"down_proj"])
    assert pool.merged_names and all(".mlp." in n and "down_proj" not in n for n in pool.merged_names)
    assert all("down_proj" not in n for n in pool.merged_names)
    with pytest.raises(AdamergeError, match="no parameter matches"):
        llama_family.pool(include=["no-such-tensor"])


def test_unmerged_tensors_keep_base_values(llama_family):
    pool = llama_family.pool(exclude=[r"embed_tokens", r"lm_head", r"layers\.1\."])
    merged = MergedModel(pool.base, pool.task_vectors(), Layer(init=1.0))
    folded = merged.fold()
    base = dict(llama_family.base().named_parameters())
    expert0 = dict(llama_family.expert(0).named_parameters())
    for name, p in folded.named_parameters():
        if name in pool.merged_names:
            assert not torch.equal(p, base[name]), name
            assert not torch.equal(p, expert0[name]), name
        else:
            assert torch.equal(p, base[name]), name
    torch.testing.assert_close(output_of(folded, llama_family.inputs), output_of(merged, llama_family.inputs))


# ---- LoRA adapters ---------------------------------------------------------------------------------


def test_lora_adapter_expert(llama_family, lora_expert):
    adapter_dir, reference = lora_expert
    pool = ExpertPool(llama_family.base(), {"lora": adapter_dir, "full": llama_family.expert(0)})
    tv = pool.task_vectors()
    ref = dict(reference.named_parameters())
    base = dict(llama_family.base().named_parameters())
    for name, stack in tv.stacks.items():
        torch.testing.assert_close(stack[0], ref[name] - base[name], rtol=0, atol=1e-7)
        if "q_proj" in name or "v_proj" in name:
            assert stack[0].abs().max() > 1e-3, name
        else:
            assert torch.equal(stack[0], torch.zeros_like(stack[0])), name
    # the same delta by hand: W0 + (alpha / r) B A
    from safetensors.torch import load_file

    adapter = load_file(adapter_dir / "adapter_model.safetensors")
    a = next(v for k, v in adapter.items() if "layers.0.self_attn.q_proj.lora_A" in k)
    b = next(v for k, v in adapter.items() if "layers.0.self_attn.q_proj.lora_B" in k)
    torch.testing.assert_close(tv.stacks["model.layers.0.self_attn.q_proj.weight"][0], (8 / 4) * b @ a)
    # the pool merged a private copy: its base is untouched
    assert all(torch.equal(p, base[n]) for n, p in pool.base.named_parameters())


def test_lora_adapter_as_base_is_refused(llama_family, lora_expert):
    adapter_dir, _ = lora_expert
    with pytest.raises(AdamergeError, match="is a LoRA adapter, not a model"):
        ExpertPool(adapter_dir, {"a": llama_family.expert(0)})


def test_lora_adapter_for_another_base(lora_expert, gpt2_family):
    adapter_dir, _ = lora_expert
    with pytest.raises(AdamergeError, match="does not fit the base"):
        ExpertPool(gpt2_family.base(), {"lora": adapter_dir}).task_vectors()


def test_base_is_frozen_and_in_eval_mode(llama_family):
    base = copy.deepcopy(llama_family.template).train()
    pool = ExpertPool(base, {"a": llama_family.expert(0)})
    assert not pool.base.training
    assert not any(p.requires_grad for p in pool.base.parameters())
