"""pool.offload=cpu: host-resident stacks streamed per tensor give the dense path's merge and gradients,
and autograd keeps no stack-sized tensor for backward (so device memory would not grow with K)."""

from __future__ import annotations

import pytest
import torch
from test_engine_options import coefficient_grads
from test_merged import jitter

from adamerge import AdamergeError, Chunk, Column, Layer, MergedModel, Task
from adamerge.loading import build_task_vectors

GRANULARITIES = {
    "task": lambda: Task(init=0.3),
    "layer": lambda: Layer(init=0.3),
    "column": lambda: Column(init=0.3),
    "chunk": lambda: Chunk(init=0.3, chunks={"*.weight": 4, "*bias": 2}),
}


def pair(family, granularity: str, dtype=torch.float32, space: str = "task_vectors"):
    """The same merge twice: stacks as buffers, and offloaded; coefficients moved off their init alike."""
    pool, tv = family.pooled
    tv = tv.to(dtype=dtype)
    models = []
    for task_vectors in (tv, tv.offload()):
        granularity_ = GRANULARITIES[granularity]()
        granularity_.space = space
        models.append(MergedModel(pool.base, task_vectors, granularity_))
        jitter(models[-1].granularity, scale=0.1)
    return models


def saved_for_backward(merged: MergedModel, inputs) -> list[torch.Tensor]:
    """Every tensor autograd saves for backward during one forward."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        merged(**inputs).logits.sum()
    return saved


def holds_a_stack(saved: list[torch.Tensor], stacks: list[torch.Tensor]) -> bool:
    """A saved tensor that is a stack, or a copy of one (a matrix stack's shape; coefficients
    of a 1-D tensor may have its stack's shape, those of a matrix never do)."""
    pointers = {s.data_ptr() for s in stacks}
    shapes = {s.shape for s in stacks if s.dim() == 3}
    return any(t.data_ptr() in pointers or t.shape in shapes for t in saved)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("granularity", list(GRANULARITIES))
def test_offload_matches_the_dense_path(llama_family, granularity, dtype):
    dense, offloaded = pair(llama_family, granularity, dtype)
    assert offloaded.host is not None and not list(offloaded.task_vectors.buffers())
    for name, w in dense.merged_weights().items():
        torch.testing.assert_close(offloaded.merged_weights()[name], w, rtol=0, atol=0)
    g_dense, g_off = coefficient_grads(dense, llama_family.inputs), coefficient_grads(offloaded, llama_family.inputs)
    torch.testing.assert_close(g_off, g_dense, rtol=1e-5, atol=1e-6 * g_dense.abs().max().item())


def test_offload_in_weight_space_and_with_recompute(gpt2_family):
    dense, offloaded = pair(gpt2_family, "column", space="weights")
    offloaded.recompute = True
    g_dense, g_off = coefficient_grads(dense, gpt2_family.inputs), coefficient_grads(offloaded, gpt2_family.inputs)
    torch.testing.assert_close(g_off, g_dense, rtol=1e-5, atol=1e-6 * g_dense.abs().max().item())


@pytest.mark.parametrize("granularity", ["layer", "column"])
def test_offload_saves_no_stack_for_backward(llama_family, granularity):
    dense, offloaded = pair(llama_family, granularity)
    stacks = list(llama_family.pooled[1].stacks.values())
    assert holds_a_stack(saved_for_backward(dense, llama_family.inputs), stacks)  # the dense path keeps them
    assert not holds_a_stack(saved_for_backward(offloaded, llama_family.inputs), stacks)


def test_offload_fold_and_teacher_mode(llama_family):
    dense, offloaded = pair(llama_family, "chunk")
    for name, p in offloaded.fold().named_parameters():
        torch.testing.assert_close(p, dense.fold().get_parameter(name), rtol=0, atol=1e-6)
    with dense.as_expert(1), offloaded.as_expert(1):
        for name, w in dense.merged_weights().items():
            assert torch.equal(offloaded.merged_weights()[name], w)
        teacher, expected = offloaded.fold(), dense.fold()
    assert all(torch.equal(p, expected.get_parameter(n)) for n, p in teacher.named_parameters())


def test_offload_config(llama_family):
    pool, _ = llama_family.pooled
    assert build_task_vectors(pool, {"offload": "cpu"}).offloaded
    assert not build_task_vectors(pool, {"offload": None}).offloaded
    with pytest.raises(AdamergeError, match=r"pool.offload='gpu'; choose from null, cpu"):
        build_task_vectors(pool, {"offload": "gpu"})
    with pytest.raises(AdamergeError, match="unset pool.device='cuda'"):
        build_task_vectors(pool, {"offload": "cpu", "device": "cuda"})


def test_projected_objective_refuses_offload_before_loading_anything(tmp_path):
    from hydra import compose, initialize_config_module

    from adamerge.run import run

    overrides = ["objective=projected", "pool.offload=cpu", f"pool.base={tmp_path / 'missing'}",
                 "+pool.experts.a=./a", "output_dir=null", "logger=none"]
    with initialize_config_module("adamerge.conf", version_base=None):
        cfg = compose("config", overrides=overrides)
    with pytest.raises(AdamergeError, match=r"objective=projected rewrites .* does not take pool.offload=cpu"):
        run(cfg, tmp_path)
