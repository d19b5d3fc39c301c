"""Engine options against the dense fp32 path: recompute, reduced-precision task vectors."""

from __future__ import annotations

import pytest
import torch

from adamerge import Column, Layer, MergedModel, Task


def coefficient_grads(merged: MergedModel, inputs) -> torch.Tensor:
    merged.granularity.zero_grad()
    merged(**inputs).logits.float().logsumexp(-1).mean().backward()
    return torch.cat([p.grad.flatten() for p in merged.granularity.parameters()])


@pytest.mark.parametrize("granularity", [Task, Layer, Column])
def test_recompute_gives_the_same_outputs_and_gradients(llama_family, granularity):
    pool, tv = llama_family.pooled
    base, inputs = pool.base, llama_family.inputs
    plain = MergedModel(base, tv, granularity(init=0.3))
    again = MergedModel(base, tv, granularity(init=0.3), recompute=True)
    assert torch.equal(plain(**inputs).logits, again(**inputs).logits)
    assert torch.allclose(coefficient_grads(plain, inputs), coefficient_grads(again, inputs), atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("granularity", [Task, Layer, Column])
def test_reduced_precision_task_vectors_match_fp32(llama_family, granularity, dtype):
    pool, _ = llama_family.pooled
    base, inputs = pool.base, llama_family.inputs
    full = MergedModel(base, pool.task_vectors(), granularity(init=0.3))
    half = MergedModel(base, pool.task_vectors(dtype=dtype), granularity(init=0.3))
    assert all(half.stack(n).dtype == dtype for n in half.names)
    merged_full, merged_half = full.merged_weights(), half.merged_weights()
    for name in full.names:
        assert merged_half[name].dtype == torch.float32  # accumulated into the fp32 base weight
        delta = (merged_full[name] - base.get_parameter(name)).abs().max()
        assert (merged_half[name] - merged_full[name]).abs().max() <= 0.02 * delta + 1e-6
    g_full, g_half = coefficient_grads(full, inputs), coefficient_grads(half, inputs)
    assert torch.allclose(g_half, g_full, rtol=0.05, atol=0.01 * g_full.abs().max())  # bf16 eps is 2^-8
