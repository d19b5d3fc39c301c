"""Static merges against independent references written here, on plain ``{name: tensor}`` dicts.

Each reference restates its source in a few lines: the TIES reference code (prateeky2806/ties-merging,
src/utils/merge_utils.py ``topk_values_mask``/``resolve_sign``/``disjoint_merge``, as FusionBench copies
it) and mergekit 0.1.5
(``sparsify.py``, ``generalized_task_arithmetic.py``). adamerge's side runs the engine: ``pool.preprocess``
through ``apply_preprocess`` with the weights of ``granularity.init``, a ``Task`` granularity at that
init, and ``MergedModel.fold``. Llama (nn.Linear, RMSNorm) and GPT-2 (Conv1D, tied embeddings), fp32.

Random methods (DARE, DELLA) share the seed contract of ``taskvectors.uniform_draw``: one generator
seeded with ``seed``, one ``torch.rand((K, *shape))`` per tensor in parameter order; an entry is kept
where that draw is ``>= p`` (DARE) or ``< p_keep`` (DELLA). The references draw their own uniforms by
that contract, so masks, probabilities and rescaling are all compared exactly.
"""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from adamerge import AdamergeError
from adamerge.granularity import Task
from adamerge.loading import apply_preprocess
from adamerge.merged import MergedModel
from adamerge.taskvectors import TaskVectors, agreeing

SEED = 5
WEIGHTS = {"math": 0.5, "code": 0.3, "chat": 0.8}  # unequal per-expert weights (mergekit's `weight`)
TOL = 1e-6


# ---- the references -----------------------------------------------------------------------------


def deltas_of(base: dict, experts: list[dict], name: str) -> torch.Tensor:
    return torch.stack([e[name] - base[name] for e in experts])


def ties_reference(base: dict, experts: list[dict], density: float, lam: float) -> dict:
    """The TIES reference: one top-k over each model's flattened task vector, unweighted sign, disjoint mean."""
    names = list(base)
    flat = torch.stack([torch.cat([(e[n] - base[n]).flatten() for n in names]) for e in experts])
    d = flat.shape[1]
    kth = flat.abs().kthvalue(d - int(d * density), dim=1, keepdim=True).values
    trimmed = flat * (flat.abs() >= kth)
    sign = torch.sign(trimmed.sum(0))
    sign[sign == 0] = torch.sign(sign.sum())
    selected = trimmed * torch.where(sign > 0, trimmed > 0, trimmed < 0)
    merged = selected.sum(0) / (selected != 0).sum(0).clamp(min=1)
    pieces = merged.split([base[n].numel() for n in names])
    return {n: base[n] + lam * piece.view_as(base[n]) for n, piece in zip(names, pieces, strict=True)}


def mk_rescale(delta: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """mergekit ``rescaled_masked_tensor`` with the L1 norm."""
    before, after = delta.abs().sum(), masked.abs().sum()
    return masked if before < 1e-7 or after < 1e-7 else masked * (before / after)


def mk_magnitude(delta: torch.Tensor, density: float, **_) -> torch.Tensor:
    mask = torch.zeros(delta.numel())
    mask[torch.argsort(delta.abs().reshape(-1), descending=True)[: max(1, int(density * delta.numel()))]] = 1
    return delta * mask.view_as(delta)


def mk_outliers(delta: torch.Tensor, density: float, gamma: float, **_) -> torch.Tensor:
    n = delta.numel()
    target, bottom = int(density * n), max(0, n - int(density * n) - int(gamma * n))
    mask = torch.zeros(n)
    mask[torch.sort(delta.abs().reshape(-1)).indices[bottom: bottom + target]] = 1
    return delta * mask.view_as(delta)


def mk_dare(delta: torch.Tensor, p: float, u: torch.Tensor, **_) -> torch.Tensor:
    return mk_rescale(delta, delta * (u >= p))


def mk_della(delta: torch.Tensor, density: float, epsilon: float, u: torch.Tensor, **_) -> torch.Tensor:
    rows = delta if delta.dim() >= 2 else delta.unsqueeze(0)
    ranks = rows.abs().argsort(dim=1, stable=True).argsort(dim=1).float()
    probs = (density - epsilon) + ranks / (rows.shape[1] - 1) * 2 * epsilon
    return mk_rescale(delta, delta * (u < probs.view_as(delta)))


def mergekit_reference(base: dict, experts: list[dict], weights: list[float], sparsify, consensus: bool,
                       normalize: bool, lam: float = 1.0, **options) -> dict:
    """mergekit's GeneralizedTaskArithmetic merge per tensor, uniforms drawn by the seed contract."""
    gen, w, out = torch.Generator().manual_seed(SEED), torch.tensor(weights), {}
    for name in base:
        raw = deltas_of(base, experts, name)
        u = torch.rand(raw.shape, generator=gen)
        d = torch.stack([sparsify(raw[k], u=u[k], **options) for k in range(len(experts))])
        wv = w.view(-1, *[1] * (d.dim() - 1))
        d = d * wv
        if consensus:
            mask = d.sign() == torch.where(d.sum(0) >= 0, 1.0, -1.0)
            mixed, divisor = (d * mask).sum(0), (wv * mask).sum(0)
            divisor[divisor == 0] = 1
        else:
            mixed, divisor = d.sum(0), wv.sum(0)
        out[name] = base[name] + lam * (mixed / divisor if normalize else mixed)
    return out


def paper_random_reference(base: dict, experts: list[dict], method: str, consensus: bool, lam: float,
                           **options) -> dict:
    """DARE (drop p, rescale 1/(1-p)) or DELLA MagPrune (rank over the tensor, rescale 1/p_keep), then
    TIES' unweighted election and disjoint mean where ``consensus``, scaled by ``lam``."""
    gen, out = torch.Generator().manual_seed(SEED), {}
    for name in base:
        raw = deltas_of(base, experts, name)
        u = torch.rand(raw.shape, generator=gen)
        if method == "dare":
            d = raw * (u >= options["p"]) / (1 - options["p"])
        else:
            flat = raw.flatten(1).abs()
            ranks = (flat.argsort(dim=1, stable=True).argsort(dim=1).float() / (flat.shape[1] - 1)).view_as(raw)
            p_keep = options["density"] - options["epsilon"] + 2 * options["epsilon"] * ranks
            d = raw * (u < p_keep) / p_keep
        if consensus:
            sign = torch.sign(d.sum(0))
            sign[sign == 0] = torch.sign(sign.sum())
            d = d * torch.where(sign > 0, d > 0, d < 0)
            merged = d.sum(0) / (d != 0).sum(0).clamp(min=1)
        else:
            merged = d.sum(0)
        out[name] = base[name] + lam * merged
    return out


def breadcrumbs_paper_reference(base: dict, experts: list[dict], density: float, gamma: float, lam: float) -> dict:
    """Breadcrumbs as adamerge's paper convention counts it: per tensor, round(gamma n) outliers and
    round(density n) kept below them."""
    out = {}
    for name in base:
        d = deltas_of(base, experts, name).flatten(1)
        n = d.shape[1]
        order = d.abs().argsort(dim=1)
        mask = torch.zeros_like(d)
        top = n - round(gamma * n)
        mask.scatter_(1, order[:, top - round(density * n): top], 1.0)
        out[name] = base[name] + lam * (d * mask).sum(0).view_as(base[name])
    return out


# ---- adamerge's side ------------------------------------------------------------------------------


def adamerge_merge(family, preprocess: dict, init) -> dict:
    pool, tv = family.pooled
    processed = apply_preprocess(tv, {**preprocess, "weights": init}, seed=SEED)
    return dict(MergedModel(pool.base, processed, Task(init=init)).fold().named_parameters())


def plain_dicts(family) -> tuple[dict, list[dict]]:
    base = {n: p.detach().clone() for n, p in family.base().named_parameters()}
    experts = [{n: p.detach() for n, p in family.expert(k).named_parameters()} for k in range(3)]
    return base, experts


def max_diff(a: dict, b: dict) -> float:
    assert list(a) == list(b)
    return max((a[n] - b[n]).abs().max().item() for n in a)


MERGEKIT = {  # name -> (preprocess config, reference sparsifier, consensus, normalize, reference options)
    "ties": ({"method": "ties", "density": 0.2, "disjoint_mean": True}, mk_magnitude, True, True,
             {"density": 0.2}),
    "ties (no normalize)": ({"method": "ties", "density": 0.3}, mk_magnitude, True, False, {"density": 0.3}),
    "dare_linear": ({"method": "dare_linear", "p": 0.7}, mk_dare, False, False, {"p": 0.7}),
    "dare_ties": ({"method": "dare_ties", "p": 0.6, "disjoint_mean": True}, mk_dare, True, True, {"p": 0.6}),
    "breadcrumbs": ({"method": "breadcrumbs", "density": 0.8, "gamma": 0.05}, mk_outliers, False, False,
                    {"density": 0.8, "gamma": 0.05}),
    "breadcrumbs_ties": ({"method": "breadcrumbs_ties", "density": 0.5, "gamma": 0.02}, mk_outliers, True,
                         False, {"density": 0.5, "gamma": 0.02}),
    "della": ({"method": "della", "density": 0.4, "epsilon": 0.15, "disjoint_mean": True}, mk_della, True, True,
              {"density": 0.4, "epsilon": 0.15}),
    "della_linear": ({"method": "della_linear", "density": 0.4, "epsilon": 0.15}, mk_della, False, False,
                     {"density": 0.4, "epsilon": 0.15}),
}


@pytest.mark.parametrize("variant", list(MERGEKIT))
def test_mergekit_convention_matches_mergekit_with_unequal_weights(family, variant):
    cfg, sparsify, consensus, normalize, options = MERGEKIT[variant]
    base, experts = plain_dicts(family)
    weights = [WEIGHTS[e] for e in family.expert_names]
    expected = mergekit_reference(base, experts, weights, sparsify, consensus, normalize, **options)
    got = adamerge_merge(family, {**cfg, "convention": "mergekit"}, dict(WEIGHTS))
    assert max_diff(got, expected) <= TOL
    assert max_diff(got, base) > 1e-3  # the merge moved the weights


def test_mergekit_lambda_is_the_coefficients_over_the_weights(family):
    """mergekit ``lambda=1.1`` with weights w: ``granularity.init = 1.1 w``, ``pool.preprocess.weights = w``."""
    base, experts = plain_dicts(family)
    weights = [WEIGHTS[e] for e in family.expert_names]
    expected = mergekit_reference(base, experts, weights, mk_magnitude, True, True, lam=1.1, density=0.2)
    pool, tv = family.pooled
    cfg = {"method": "ties", "density": 0.2, "disjoint_mean": True, "convention": "mergekit", "weights": WEIGHTS}
    init = {e: 1.1 * w for e, w in WEIGHTS.items()}
    got = dict(MergedModel(pool.base, apply_preprocess(tv, cfg), Task(init=init)).fold().named_parameters())
    assert max_diff(got, expected) <= TOL


@pytest.mark.parametrize("lam", [1.0, 0.4])
def test_paper_ties_matches_the_reference(family, lam):
    base, experts = plain_dicts(family)
    got = adamerge_merge(family, {"method": "ties", "density": 0.2, "disjoint_mean": True}, lam)
    assert max_diff(got, ties_reference(base, experts, 0.2, lam)) <= TOL


def test_paper_ties_tensor_scope_is_the_reference_per_tensor(family):
    base, experts = plain_dicts(family)
    got = adamerge_merge(family, {"method": "ties", "density": 0.2, "disjoint_mean": True, "scope": "tensor"}, 1.0)
    expected = {}
    for name in base:  # the reference applied to each tensor as if it were a model
        expected.update(ties_reference({name: base[name]}, [{name: e[name]} for e in experts], 0.2, 1.0))
    assert max_diff(got, expected) <= TOL
    assert max_diff(got, ties_reference(base, experts, 0.2, 1.0)) > 1e-3  # scope matters


@pytest.mark.parametrize(("method", "consensus", "options"), [
    ("dare", False, {"p": 0.5}),
    ("dare_ties", True, {"p": 0.5}),
    ("della", True, {"density": 0.4, "epsilon": 0.2}),
    ("della_linear", False, {"density": 0.4, "epsilon": 0.2}),
])
def test_paper_random_methods_match_their_definitions(family, method, consensus, options):
    base, experts = plain_dicts(family)
    kind = "dare" if method.startswith("dare") else "della"
    got = adamerge_merge(family, {"method": method, "disjoint_mean": consensus, **options}, 0.7)
    assert max_diff(got, paper_random_reference(base, experts, kind, consensus, 0.7, **options)) <= TOL


def test_paper_breadcrumbs_matches_its_definition(family):
    base, experts = plain_dicts(family)
    got = adamerge_merge(family, {"method": "breadcrumbs", "density": 0.8, "gamma": 0.05}, 0.5)
    assert max_diff(got, breadcrumbs_paper_reference(base, experts, 0.8, 0.05, 0.5)) <= TOL


# ---- the rules that random data never reaches -------------------------------------------------------


def test_an_exactly_zero_sign_sum_elects_plus_in_mergekit_and_the_majority_in_the_paper():
    s = torch.tensor([[1.0, 2.0, -1.0, 3.0], [-1.0, 1.0, -1.0, 2.0]])  # column 0 sums to 0
    assert agreeing(s, torch.ones(2), "mergekit")[:, 0].tolist() == [True, False]
    assert agreeing(s, torch.ones(2), "paper")[:, 0].tolist() == [True, False]  # elected signs: 0 + + - + -> +
    s[:, 1:] = -s[:, 1:].abs()  # now the other columns elect -, and so does the tie
    assert agreeing(s, torch.ones(2), "paper")[:, 0].tolist() == [False, True]
    assert agreeing(s, torch.ones(2), "mergekit")[:, 0].tolist() == [True, False]


def test_weights_enter_the_mergekit_election_only():
    s = torch.tensor([[1.0], [-0.6]])
    heavy_second = torch.tensor([1.0, 2.0])
    assert agreeing(s, heavy_second, "mergekit")[:, 0].tolist() == [False, True]  # 1 - 1.2 < 0
    assert agreeing(s, heavy_second, "paper")[:, 0].tolist() == [True, False]  # 1 - 0.6 > 0


def test_preprocess_weights_follow_granularity_init_in_the_composed_config():
    from hydra import compose, initialize_config_module

    with initialize_config_module("adamerge.conf", version_base=None):
        cfg = compose("config", overrides=["granularity=task", "granularity.init={math: 0.5, code: 0.3}"])
    assert OmegaConf.to_container(cfg.pool.preprocess, resolve=True)["weights"] == {"math": 0.5, "code": 0.3}


@pytest.mark.parametrize(("options", "message"), [
    ({"method": "ties", "convention": "peft"}, r"convention='peft'; choose from \['paper', 'mergekit'\]"),
    ({"method": "ties", "scope": "layer"}, r"pool.preprocess.scope='layer'; choose from null, tensor, model"),
    ({"method": "ties", "rescale": True}, "ties has no rescaling in its paper"),
    ({"method": "ties", "weights": {"x": 1.0}}, r"no value for expert\(s\) \['y', 'z'\]"),
    ({"method": "ties", "weights": "equal"}, "pool.preprocess.weights='equal'"),
    ({"method": "della", "convention": "mergekit", "density": 0.9, "epsilon": 0.1}, "mergekit: < 1"),
    ({"method": "dare_ties", "convention": "mergekit", "weights": 0.0}, "weights are all 0"),
    ({"method": "ties", "weights": [1.0, 2.0]}, r"weights=\[1.0, 2.0\]; give a number"),
])
def test_bad_preprocess_options(options, message):
    stacks = {"w": torch.randn(3, 4, 4)}
    tv = TaskVectors(["x", "y", "z"], {"w": None}, stacks)
    with pytest.raises(AdamergeError, match=message):
        apply_preprocess(tv, options)
