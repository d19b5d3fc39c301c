"""Task-vector transforms of issue 16 §1 (adamerge/spectral.py, taskvectors.consensus), each against a
few lines restating its paper's released code, plus its defining property, and one learned run on top.

References: TSV-M github.com/AntoAndGar/task_singular_vectors src/utils/TSVM_utils.py
``compute_and_sum_svd_mem_reduction``; ISO-C / ISO-CTS github.com/danielm1405/iso-merging
src/utils/iso.py; Consensus src/utils/tallmask_utils.py of the same repository; STAR github.com/IBM/STAR
merger/STAR.py; PCB github.com/duguodong7/pcb-merging pcb-merging.py; Model Stock FusionBench's
fusion_bench/method/model_stock/model_stock.py; SLERP mergekit/merge_methods/slerp.py.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from omegaconf import OmegaConf

from adamerge import AdamergeError
from adamerge.spectral import iso_c, iso_cts, star, tsv
from adamerge.taskvectors import consensus, model_stock, pcb, preprocess, slerp

K = 3
TOL = dict(rtol=1e-4, atol=1e-5)


def stack_of(k: int = K, m: int = 12, n: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(k, m, n, generator=torch.Generator().manual_seed(seed))


# ---- the references, restated from the released code ---------------------------------------------------


def tsv_reference(tvs: list[torch.Tensor]) -> torch.Tensor:
    """``compute_and_sum_svd_mem_reduction`` for one 2-D key."""
    u0, s0, v0 = torch.linalg.svd(tvs[0], full_matrices=False)
    sum_u, sum_s, sum_v = torch.zeros_like(u0), torch.zeros_like(s0), torch.zeros_like(v0)
    r = s0.shape[0] // len(tvs)
    for i, vec in enumerate(tvs):
        u, s, v = torch.linalg.svd(vec, full_matrices=False)
        sum_u[:, i * r:(i + 1) * r], sum_s[i * r:(i + 1) * r], sum_v[i * r:(i + 1) * r] = u[:, :r], s[:r], v[:r]
    u_u, _, v_u = torch.linalg.svd(sum_u, full_matrices=False)
    u_v, _, v_v = torch.linalg.svd(sum_v, full_matrices=False)
    return torch.linalg.multi_dot((u_u, v_u, torch.diag(sum_s), u_v, v_v))


def iso_c_reference(tvs: list[torch.Tensor]) -> torch.Tensor:
    u, s, v = torch.linalg.svd(sum(tvs), full_matrices=False)
    return torch.linalg.multi_dot((u, torch.diag(torch.ones_like(s) * s.mean()), v))


def iso_cts_reference(tvs: list[torch.Tensor], fraction: float = 0.8) -> torch.Tensor:
    shape, k = tvs[0].shape, len(tvs)
    common = int(min(shape) * fraction)
    common = min(shape) - round((min(shape) - common) / k) * k
    u, s, v = torch.linalg.svd(sum(tvs), full_matrices=False)
    cu, cs, cv = u[:, :common], s[:common], v[:common]
    per = int((min(shape) - common) / k)
    for i, w in enumerate(tvs):
        ut, st, vt = torch.linalg.svd(w - cu @ cu.T @ w, full_matrices=False)
        if i == 0:
            all_u, all_s, all_v = torch.zeros_like(ut), torch.zeros_like(st), torch.zeros_like(vt)
        all_u[:, i * per:(i + 1) * per], all_s[i * per:(i + 1) * per], all_v[i * per:(i + 1) * per] = (
            ut[:, :per], st[:per], vt[:per])
    all_u[:, k * per:], all_s[k * per:], all_v[k * per:] = cu, cs, cv
    uu, _, vu = torch.linalg.svd(all_u, full_matrices=False)
    uv, _, vv = torch.linalg.svd(all_v, full_matrices=False)
    return torch.linalg.multi_dot((uu @ vu, torch.diag(torch.ones_like(all_s) * all_s.mean()), uv @ vv))


# ---- spectral transforms -------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(12, 8), (8, 12), (9, 9)])
@pytest.mark.parametrize("transform, reference", [(tsv, tsv_reference), (iso_c, iso_c_reference),
                                                  (iso_cts, iso_cts_reference)])
def test_spectral_pieces_sum_to_the_papers_merge(transform, reference, shape):
    stack = stack_of(m=shape[0], n=shape[1])
    torch.testing.assert_close(transform(stack).sum(0), reference(list(stack)), **TOL)


def test_tsv_ranks_per_expert_and_merged():
    stack = stack_of(k=4, m=12, n=10)  # r = 10, 10 // 4 = 2 per task
    pieces = tsv(stack)
    assert [int(torch.linalg.matrix_rank(p)) for p in pieces] == [2] * 4
    assert int(torch.linalg.matrix_rank(pieces.sum(0))) <= 4 * 2
    assert not tsv(stack_of(k=4, m=3, n=5)).any()  # fewer singular values than tasks: nothing kept


def test_iso_merges_are_isotropic():
    for transform in (iso_c, iso_cts):
        s = torch.linalg.svdvals(transform(stack_of()).sum(0))
        torch.testing.assert_close(s, s.mean().expand_as(s), **TOL)
    low = stack_of(k=2, m=12, n=8)[:, :, :1].expand(2, 12, 8).contiguous()  # sum of rank 1
    s = torch.linalg.svdvals(iso_c(low).sum(0))
    assert (s > 1e-4).sum() == 1  # the flat spectrum stays within the sum's support


def test_iso_cts_subspace_sizes():
    from adamerge.spectral import common_size

    assert [common_size(32, 3, 0.8), common_size(8, 3, 0.8), common_size(5, 3, 0.0)] == [26, 5, 2]
    s = torch.linalg.svdvals(iso_cts(stack_of(m=5, n=5), common_fraction=0.0).sum(0))
    torch.testing.assert_close(s, s.mean().expand_as(s), **TOL)


def test_non_matrices_take_the_mean():
    vectors = torch.randn(K, 7)
    for transform in (tsv, iso_c, iso_cts):
        torch.testing.assert_close(transform(vectors).sum(0), vectors.mean(0))


def test_half_precision_stacks_come_back_in_their_dtype():
    assert tsv(stack_of().bfloat16()).dtype == torch.bfloat16


def star_reference(matrix: torch.Tensor, eta: float) -> torch.Tensor:
    u, s, vt = torch.linalg.svd(matrix, full_matrices=False)
    rank = torch.searchsorted(torch.cumsum(s, 0), s.sum() * eta / 100).item() + 1
    kept = s[:rank]
    return u[:, :rank] @ torch.diag_embed(s.sum() / kept.sum() * kept) @ vt[:rank]


@pytest.mark.parametrize("eta", [10.0, 40.0, 100.0])
def test_star_truncates_each_expert_and_keeps_its_nuclear_norm(eta):
    stack = stack_of()
    out = star(stack, eta)
    for k in range(K):
        torch.testing.assert_close(out[k], star_reference(stack[k], eta), **TOL)
        torch.testing.assert_close(torch.linalg.svdvals(out[k]).sum(), torch.linalg.svdvals(stack[k]).sum(), **TOL)
    assert torch.equal(star(stack[:, 0], eta), stack[:, 0])  # vectors untouched


# ---- PCB, Model Stock ----------------------------------------------------------------------------------


def pcb_reference(flat: torch.Tensor, ratio: float) -> torch.Tensor:
    """``PCB_merge`` of pcb-merging.py."""
    def normalize(x):
        low, high = x.min(1, keepdim=True).values, x.max(1, keepdim=True).values
        return (x - low) / (high - low)

    def clamp(x, min_ratio, max_ratio):
        d = x.size(1)
        sorted_x = torch.sort(x, dim=1).values
        return torch.clamp(x, sorted_x[:, int(d * min_ratio)].unsqueeze(1),
                           sorted_x[:, int(d * (1 - max_ratio) - 1)].unsqueeze(1))

    n = flat.shape[0]
    magnitude = clamp(flat.abs(), 0.0001, 0.0001)
    task_pcb = torch.exp(n * normalize(magnitude) ** 2) * torch.tanh(flat * flat.sum(0))
    scale = normalize(clamp(task_pcb, 1 - ratio, 0))
    return torch.sum(torch.sign(flat) * magnitude * scale, 0) / torch.clamp(scale.sum(0), min=1e-12)


def test_pcb_matches_its_code_and_keeps_each_experts_top_scores():
    flat = torch.randn(K, 20000, generator=torch.Generator().manual_seed(1))
    pieces = pcb(flat, ratio=0.1)
    torch.testing.assert_close(pieces.sum(0), pcb_reference(flat, 0.1), **TOL)
    assert all(0.09 <= (p != 0).float().mean() <= 0.1 for p in pieces)  # the top 10% (ties at the edge)


def test_model_stock_interpolation_ratio():
    base_dir = torch.randn(40, generator=torch.Generator().manual_seed(2))
    stack = torch.stack([base_dir + 0.5 * torch.randn(40, generator=torch.Generator().manual_seed(3 + k))
                         for k in range(K)]).view(K, 8, 5)
    flat = stack.flatten(1)
    cos = [torch.nn.functional.cosine_similarity(flat[i], flat[j], 0) for i in range(K) for j in range(i + 1, K)]
    angle = torch.stack([torch.arccos(c) for c in cos]).mean()
    t = K * torch.cos(angle) / ((K - 1) * torch.cos(angle) + 1)
    torch.testing.assert_close(model_stock(stack).sum(0), t * stack.mean(0), **TOL)
    two = stack[:2].flatten(1)
    c = torch.nn.functional.cosine_similarity(two[0], two[1], 0)
    torch.testing.assert_close(model_stock(stack[:2]).sum(0), 2 * c / (1 + c) * stack[:2].mean(0), **TOL)


# ---- consensus -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("min_agree", [0, 1, 2, 3])
def test_consensus_keeps_entries_enough_tall_masks_need(min_agree):
    raw = stack_of(m=6, n=5)
    processed = raw * (raw.abs() > 0.3)  # any earlier step
    out = consensus(processed, raw, min_agree, tall_lambda=0.6)
    merged = processed.sum(0)
    for i in range(6):
        for j in range(5):
            votes = sum(bool(raw[t, i, j].abs() > 0.6 * (merged[i, j] - raw[t, i, j]).abs()) for t in range(K))
            expected = processed[:, i, j] if votes >= min_agree else torch.zeros(K)
            assert torch.equal(out[:, i, j], expected)


def slerp_reference(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """mergekit's ``slerp`` for one tensor (normalized copies, arccos, linear when nearly collinear)."""
    n0, n1 = v0.norm(), v1.norm()
    dot = ((v0 / (n0 if n0 > 1e-8 else 1)) * (v1 / (n1 if n1 > 1e-8 else 1))).sum().clamp(-1, 1)
    if dot.abs() > 0.9995:
        return (1 - t) * v0 + t * v1
    theta = torch.acos(dot)
    return torch.sin((1 - t) * theta) / torch.sin(theta) * v0 + torch.sin(t * theta) / torch.sin(theta) * v1


@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0])
def test_slerp_is_mergekits_interpolation_of_the_two_experts(t):
    w0 = torch.randn(6, 4, generator=torch.Generator().manual_seed(4))
    stack = 0.7 * stack_of(k=2, m=6, n=4)
    merged = w0 + slerp(stack, w0, t).sum(0)
    torch.testing.assert_close(merged, slerp_reference(t, w0 + stack[0], w0 + stack[1]), **TOL)
    collinear = torch.stack([w0, 2 * w0])  # W_A = 2 W0, W_B = 3 W0: linear interpolation
    torch.testing.assert_close(w0 + slerp(collinear, w0, t).sum(0), (1 - t) * 2 * w0 + t * 3 * w0, **TOL)
    with pytest.raises(AdamergeError, match="exactly two experts"):
        slerp(stack_of(), w0, t)


# ---- LiNeS: a per-layer start of the coefficients ---------------------------------------------------


def test_lines_coefficients_grow_linearly_with_depth(llama_family):
    from adamerge.granularity import Layer, Task

    infos = list(llama_family.infos().values())
    layer = Layer(init="uniform", lines_beta=0.6)
    layer.setup(list(llama_family.expert_names), infos)
    table = layer.table()
    start = {"model.embed_tokens.weight": 1 / K, "model.layers.0.mlp.up_proj.weight": 1 / K,
             "model.layers.1.self_attn.q_proj.weight": 1 / K + 0.6, "lm_head.weight": 1 / K}
    for name, value in start.items():
        torch.testing.assert_close(table[name], torch.full((K, 1), value))
    with pytest.raises(AdamergeError, match="lines_beta scales each layer"):
        Task(init=0.3, lines_beta=0.5).setup(list(llama_family.expert_names), infos)
    with pytest.raises(AdamergeError, match="lines_beta='x'"):
        Layer(lines_beta="x")


# ---- through the engine --------------------------------------------------------------------------------


def test_preprocess_chains_consensus_after_ties(llama_family):
    _, tv = llama_family.pooled
    ties_only = preprocess(tv, "ties", density=0.5, scope="tensor")
    chained = preprocess(tv, "ties", density=0.5, scope="tensor", then="consensus")
    for name in tv.names:
        expected = consensus(ties_only.stacks[name], tv.stacks[name])
        assert torch.equal(chained.stacks[name], expected)
    spectral = preprocess(tv, "tsv")
    name = "model.layers.0.mlp.down_proj.weight"
    torch.testing.assert_close(spectral.stacks[name].sum(0), tsv_reference(list(tv.stacks[name])), **TOL)
    whole = preprocess(tv, "pcb", pcb_ratio=0.1)  # scope=model under the paper convention: one ranking
    flat = torch.cat([tv.stacks[n].flatten(1) for n in tv.names], 1)
    torch.testing.assert_close(torch.cat([whole.stacks[n].flatten(1) for n in tv.names], 1), pcb(flat, 0.1))
    stock = preprocess(tv, "model_stock")
    assert torch.equal(stock.stacks[name], model_stock(tv.stacks[name]))
    two = replace(tv, experts=tv.experts[:2], stacks={n: s[:2] for n, s in tv.stacks.items()})
    w0 = tv.base[name]
    torch.testing.assert_close(w0 + preprocess(two, "slerp", slerp_t=0.3).stacks[name].sum(0),
                               slerp_reference(0.3, w0 + two.stacks[name][0], w0 + two.stacks[name][1]), **TOL)
    with pytest.raises(AdamergeError, match="needs the base's weights"):
        preprocess(replace(two, base={}), "slerp")
    with pytest.raises(AdamergeError, match="then='bogus'"):
        preprocess(tv, "ties", then=["consensus", "bogus"])
    with pytest.raises(AdamergeError, match="scope=model"):
        preprocess(tv, "iso_c", scope="model")
    for bad in ({"eta": 150.0}, {"pcb_ratio": "x"}, {"min_agree": 1.5}, {"tall_lambda": -1}):
        with pytest.raises(AdamergeError, match=rf"pool\.preprocess\.{next(iter(bad))}="):
            preprocess(tv, "consensus", **bad)


def test_learned_coefficients_on_top_of_tsv(tmp_path):
    """``method=adamerging_task pool.preprocess.method=tsv``: AdaMerging learns on the TSV-M pieces."""
    from hydra import compose, initialize_config_module
    from tiny import write_zoo

    from adamerge.loading import as_dict
    from adamerge.overrides import open_mapping_overrides
    from adamerge.run import run

    zoo = write_zoo(tmp_path / "zoo", rows=4)
    overrides = [*zoo.cli_args(), "method=adamerging_task", "pool.preprocess.method=tsv",
                 "pool.preprocess.then=consensus", "trainer.max_steps=2", "trainer.accumulate_grad_batches=1",
                 "data.batch_size=2", "optim.lr=0.05", "logger=none", "trainer.enable_progress_bar=false",
                 "trainer.enable_checkpointing=false", "trainer.accelerator=cpu", f"output_dir={tmp_path / 'out'}"]
    with initialize_config_module("adamerge.conf", version_base=None):
        cfg = as_dict(compose("config", overrides=open_mapping_overrides(overrides)))
    cfg["output_dir"] = None
    result = run(OmegaConf.create(cfg), tmp_path / "run")
    coefficients = result.coefficients["task"]
    assert coefficients.shape == (len(zoo.experts), 1) and not torch.allclose(coefficients, torch.tensor(0.3))
