"""MergedModel and fold: the merge maths against hand computation, teacher mode, gradients, fold == forward."""

from __future__ import annotations

import pytest
import torch
from conftest import output_of

from adamerge import AdamergeError, Block, Chunk, Column, Layer, MergedModel, Task, merge_tensor
from adamerge.granularity import TRANSFORMS

K = 3
GRANULARITIES = {
    "task": lambda **kw: Task(**kw),
    "layer": lambda **kw: Layer(**kw),
    "block": lambda **kw: Block(partitions=3, **kw),
    "chunk": lambda **kw: Chunk(chunks={"*.weight": 4, "*bias": 2}, **kw),
    "column": lambda **kw: Column(**kw),
}


def merged_model(family, granularity) -> MergedModel:
    pool, tv = family.pooled
    return MergedModel(pool.base, tv, granularity)


def params_of(model) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters()}


def one_hot(family, k: int) -> dict[str, float]:
    return {name: float(i == k) for i, name in enumerate(family.expert_names)}


@torch.no_grad()
def jitter(granularity, seed: int = 0, scale: float = 0.5) -> None:
    """Move every raw coefficient off its init, differently everywhere."""
    gen = torch.Generator().manual_seed(seed)
    for p in granularity.raw.values():
        p.add_(scale * torch.randn(p.shape, generator=gen))


# ---- merge_tensor ------------------------------------------------------------------------------------


def test_merge_tensor_paths_agree():
    gen = torch.Generator().manual_seed(0)
    w0, stack = torch.randn(6, 5, generator=gen), torch.randn(K, 6, 5, generator=gen)
    c = torch.tensor([0.2, -0.5, 1.5])
    scalar, broadcast = c.view(K, 1, 1), c.view(K, 1, 1).expand(K, 1, 5)  # GEMV path vs elementwise path
    hand = w0 + sum(c[k] * stack[k] for k in range(K))
    torch.testing.assert_close(merge_tensor(w0, stack, scalar), hand)
    torch.testing.assert_close(merge_tensor(w0, stack, broadcast), hand)
    weights = sum(c[k] * (w0 + stack[k]) for k in range(K))
    torch.testing.assert_close(merge_tensor(w0, stack, scalar, "weights"), weights)
    torch.testing.assert_close(merge_tensor(w0, stack, broadcast, "weights"), weights)


# ---- properties of the fold ----------------------------------------------------------------------------


@pytest.mark.parametrize("granularity", list(GRANULARITIES))
def test_zero_coefficients_give_the_base(family, granularity):
    merged = merged_model(family, GRANULARITIES[granularity](init=0.0))
    folded, base = params_of(merged.fold()), params_of(family.base())
    assert folded.keys() == base.keys()
    for name in base:
        torch.testing.assert_close(folded[name], base[name], rtol=0, atol=0)
    torch.testing.assert_close(output_of(merged, family.inputs), output_of(family.base(), family.inputs))


@pytest.mark.parametrize("space", ["task_vectors", "weights"])
@pytest.mark.parametrize("granularity", ["task", "layer", "column"])
def test_one_hot_coefficients_give_expert_k(family, granularity, space):
    for k in range(K):
        merged = merged_model(family, GRANULARITIES[granularity](init=one_hot(family, k), space=space))
        folded, expert = merged.fold(), family.expert(k)
        exp_params = params_of(expert)
        for name, p in params_of(folded).items():
            torch.testing.assert_close(p, exp_params[name], rtol=0, atol=1e-6)
        expected = output_of(expert, family.inputs)
        assert (output_of(merged, family.inputs) - expected).abs().max() <= 1e-5
        assert (output_of(folded, family.inputs) - expected).abs().max() <= 1e-5


def test_teacher_mode_is_expert_k(family):
    merged = merged_model(family, Layer(init=0.3))
    student = output_of(merged, family.inputs)
    w0 = params_of(family.base())
    for k, name in enumerate(family.expert_names):
        expected = output_of(family.expert(k), family.inputs)
        for key in (k, name):
            with merged.as_expert(key) as teacher:
                assert teacher is merged
                assert (output_of(teacher, family.inputs) - expected).abs().max() <= 1e-5
                weights = teacher.merged_weights()
                for n, stack in family.pooled[1].stacks.items():
                    torch.testing.assert_close(weights[n], w0[n] + stack[k], rtol=0, atol=0)
                folded = teacher.fold()
            assert (output_of(folded, family.inputs) - expected).abs().max() <= 1e-5
    torch.testing.assert_close(output_of(merged, family.inputs), student, rtol=0, atol=0)  # restored
    with pytest.raises(AdamergeError, match=r"no expert 'nope'"), merged.as_expert("nope"):
        pass
    with pytest.raises(AdamergeError, match="no expert 3"), merged.as_expert(3):
        pass


def test_teacher_mode_is_restored_after_an_error(llama_family):
    merged = merged_model(llama_family, Task(init=0.5))
    with pytest.raises(RuntimeError), merged.as_expert(1):
        raise RuntimeError("boom")
    assert merged._expert is None


@pytest.mark.parametrize("lam", [0.3, 1.0])
def test_task_arithmetic_by_hand(family, lam):
    folded = params_of(merged_model(family, Task(init=lam)).fold())
    w0 = params_of(family.base())
    experts = [params_of(family.expert(k)) for k in range(K)]
    for name in w0:
        hand = w0[name] + lam * sum(experts[k][name] - w0[name] for k in range(K))
        torch.testing.assert_close(folded[name], hand, rtol=0, atol=1e-6)


def test_weight_space_by_hand(family):
    c = {"math": 0.2, "code": 0.5, "chat": 0.3}
    folded = params_of(merged_model(family, Layer(init=c, space="weights")).fold())
    experts = {n: params_of(family.expert(n)) for n in c}
    for name, p in folded.items():
        torch.testing.assert_close(p, sum(c[e] * experts[e][name] for e in c), rtol=0, atol=1e-6)


def test_weight_space_column_by_hand(llama_family):
    merged = merged_model(llama_family, Column(init=0.5, space="weights"))
    name = "model.layers.0.self_attn.o_proj.weight"
    c = torch.rand(K, 32, generator=torch.Generator().manual_seed(1))
    merged.granularity.load_table({name: c})
    w = merged.merged_weights()[name]
    experts = [params_of(llama_family.expert(k))[name] for k in range(K)]
    torch.testing.assert_close(w, sum(c[k][None, :] * experts[k] for k in range(K)))


# ---- gradients ---------------------------------------------------------------------------------------------


def loss_of(merged, family) -> torch.Tensor:
    logits = merged(**family.inputs).logits
    probe = torch.randn(logits.shape, generator=torch.Generator().manual_seed(0))
    return (logits * probe).sum()


@pytest.mark.parametrize("space", ["task_vectors", "weights"])
@pytest.mark.parametrize("granularity", list(GRANULARITIES))
def test_gradients_reach_every_coefficient(family, granularity, space):
    merged = merged_model(family, GRANULARITIES[granularity](init=0.3, space=space))
    trainable = [n for n, p in merged.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("granularity.raw.") for n in trainable)
    loss_of(merged, family).backward()
    for key, p in merged.granularity.raw.items():
        assert p.grad is not None, key
        assert torch.all(p.grad != 0), f"{key}: {int((p.grad == 0).sum())} of {p.numel()} coefficients get no gradient"


@pytest.mark.parametrize("transform", ["clamp", "sigmoid", "tanh", "softmax"])
def test_gradients_through_transforms(llama_family, transform):
    merged = merged_model(llama_family, Layer(init={"math": 0.2, "code": 0.3, "chat": 0.5}, transform=transform))
    loss_of(merged, llama_family).backward()
    assert all(torch.all(p.grad != 0) for p in merged.granularity.raw.values())


def test_low_precision_task_vectors(llama_family):
    pool, tv = llama_family.pooled
    fp32 = MergedModel(pool.base, tv, Layer(init=0.4))
    bf16 = MergedModel(pool.base, tv.to(dtype=torch.bfloat16), Layer(init=0.4))
    assert bf16.stack("model.norm.weight").dtype == torch.bfloat16
    torch.testing.assert_close(output_of(bf16, llama_family.inputs), output_of(fp32, llama_family.inputs),
                               rtol=0, atol=5e-2)
    loss_of(bf16, llama_family).backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in bf16.granularity.raw.values())


# ---- fold == forward ------------------------------------------------------------------------------------


@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("space", ["task_vectors", "weights"])
@pytest.mark.parametrize("granularity", list(GRANULARITIES))
def test_fold_matches_merged_outputs(family, granularity, space, transform):
    init = {"math": 0.2, "code": 0.3, "chat": 0.5} if transform == "softmax" else 0.3
    merged = merged_model(family, GRANULARITIES[granularity](init=init, space=space, transform=transform))
    jitter(merged.granularity, seed=len(granularity) + len(transform))
    expected = output_of(merged, family.inputs)
    folded = merged.fold()
    assert type(folded) is type(family.template)
    assert (output_of(folded, family.inputs) - expected).abs().max() <= 1e-5
    assert (expected - output_of(family.base(), family.inputs)).abs().max() > 1e-3  # the merge did something


def test_fold_matches_merged_outputs_classifier(bert_family):
    merged = merged_model(bert_family, Column(init=0.4))
    jitter(merged.granularity)
    folded = merged.fold()
    assert (output_of(folded, bert_family.inputs) - output_of(merged, bert_family.inputs)).abs().max() <= 1e-5
    for task in bert_family.expert_names:  # merged backbone + that task's own head
        with merged.task(task):
            expected = output_of(merged, bert_family.inputs)
        assert (output_of(merged.fold(task=task), bert_family.inputs) - expected).abs().max() <= 1e-5


def test_tied_weights_stay_tied(gpt2_family):
    merged = merged_model(gpt2_family, Column(init=0.4))
    jitter(merged.granularity)
    folded = merged.fold()
    assert folded.lm_head.weight is folded.transformer.wte.weight
    wte = merged.merged_weights()["transformer.wte.weight"]
    torch.testing.assert_close(folded.lm_head.weight, wte, rtol=0, atol=0)
    assert not torch.equal(wte, gpt2_family.template.transformer.wte.weight)
    # the wrapped forward also projects with the merged embedding: hidden @ wte.T == logits
    hidden = merged(**gpt2_family.inputs, output_hidden_states=True).hidden_states[-1].detach()
    torch.testing.assert_close(output_of(merged, gpt2_family.inputs), hidden @ wte.T.detach())


def test_fold_leaves_the_base_alone(llama_family):
    pool, _ = llama_family.pooled
    before = {n: p.clone() for n, p in pool.base.named_parameters()}
    merged = merged_model(llama_family, Layer(init=0.7))
    folded = merged.fold()
    assert all(torch.equal(p, before[n]) for n, p in pool.base.named_parameters())
    assert all(p.data_ptr() != dict(pool.base.named_parameters())[n].data_ptr() for n, p in folded.named_parameters())
    again = merged.fold()  # idempotent
    assert all(torch.equal(p, params_of(folded)[n]) for n, p in again.named_parameters())
    assert not any(isinstance(m, MergedModel) for m in folded.modules())
