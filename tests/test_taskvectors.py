"""Task-vector preprocessing: TIES, DARE, DELLA, Breadcrumbs as pure functions on (K, *shape) stacks."""

from __future__ import annotations

import pytest
import torch

from adamerge import AdamergeError, TaskVectors, TensorInfo
from adamerge.taskvectors import breadcrumbs, dare, della, keep_top, magnitude_ranks, preprocess, ties


def stack_of(k: int, n: int, seed: int = 0) -> torch.Tensor:
    """Distinct magnitudes (no ties) in random order with random signs."""
    gen = torch.Generator().manual_seed(seed)
    magnitudes = torch.stack([torch.randperm(n, generator=gen).float() + 1 for _ in range(k)])
    signs = torch.where(torch.rand(k, n, generator=gen) < 0.5, -1.0, 1.0)
    return magnitudes * signs


def test_magnitude_ranks_per_expert():
    s = torch.tensor([[3.0, -1.0, 2.0], [-10.0, 5.0, 0.0]])
    torch.testing.assert_close(magnitude_ranks(s), torch.tensor([[1.0, 0.0, 0.5], [1.0, 0.5, 0.0]]))


@pytest.mark.parametrize("convention", ["paper", "mergekit"])
@pytest.mark.parametrize("density", [0.1, 0.2, 0.5, 1.0])
def test_trim_keeps_top_fraction_per_expert(density, convention):
    s = stack_of(3, 200).view(3, 10, 20)
    kept = keep_top(s, density, convention)
    for k in range(3):
        flat, out = s[k].flatten(), kept[k].flatten()
        # the TIES reference keeps the (n - int(d n))-th smallest and everything above it; mergekit max(1, int(d n))
        n_keep = 200 if density == 1.0 else int(density * 200) + (1 if convention == "paper" else 0)
        assert int((out != 0).sum()) == n_keep
        top = flat.abs().topk(n_keep).indices
        torch.testing.assert_close(out[top], flat[top], rtol=0, atol=0)


def test_keep_top_zero_density():
    assert torch.count_nonzero(keep_top(stack_of(2, 50), 0.0, "mergekit")) == 0
    # the reference's k = n: the largest entry (and any equal to it) survives
    assert torch.equal(torch.count_nonzero(keep_top(stack_of(2, 50), 0.0), dim=1), torch.tensor([1, 1]))


def test_ties_elects_sign_and_zeroes_disagreement():
    s = torch.tensor(
        [
            [3.0, -1.0, 2.0, 0.5],
            [-1.0, -2.0, 1.0, -0.5],
            [-1.5, 4.0, 1.0, 0.25],
        ]
    )
    out = ties(s, density=1.0)
    # column sums 0.5, 1.0, 4.0, 0.25 -> elected signs +, +, +, +
    expected = torch.tensor(
        [
            [3.0, 0.0, 2.0, 0.5],
            [0.0, 0.0, 1.0, 0.0],
            [0.0, 4.0, 1.0, 0.25],
        ]
    )
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_ties_elected_sign_follows_trimmed_mass():
    s = torch.tensor([[-5.0, 0.1, 0.2, 0.3], [1.0, 0.1, 0.2, 0.3], [1.0, 0.1, 0.2, 0.3]])
    out = ties(s, density=1.0)
    assert out[0, 0] == -5.0 and out[1, 0] == 0 and out[2, 0] == 0  # mass -3 beats two votes of +1
    # after trimming to mergekit's int(0.25 * 4) = 1 entry of each row, only entry 0 survives; -5 + 1 + 1 < 0
    out = ties(s, density=0.25, convention="mergekit")
    torch.testing.assert_close(out[:, 0], torch.tensor([-5.0, 0.0, 0.0]))
    assert torch.count_nonzero(out[:, 1:]) == 0


def test_ties_disjoint_mean_divides_by_agreeing_count():
    s = torch.tensor([[2.0, 1.0, -3.0], [4.0, -6.0, 1.0], [-1.0, 3.0, 5.0]])
    out = ties(s, density=1.0, disjoint_mean=True)
    # column 0: sign +, agree {2, 4} -> mean 3; column 1: sum -2 -> sign -, agree {-6} -> -6;
    # column 2: sum 3 -> sign +, agree {1, 5} -> mean 3
    torch.testing.assert_close(out.sum(0), torch.tensor([3.0, -6.0, 3.0]))
    torch.testing.assert_close(out[:, 0], torch.tensor([1.0, 2.0, 0.0]))


def test_ties_trims_then_elects():
    s = stack_of(3, 400, seed=1)
    out = ties(s, density=0.2)
    trimmed = keep_top(s, 0.2)
    elected = torch.sign(trimmed.sum(0))
    assert torch.all((out == 0) | (torch.sign(out) == elected))
    assert torch.all((out == 0) | (out == trimmed))
    assert torch.all(torch.count_nonzero(out, dim=1) <= 81)


def test_dare_seeded_and_rescaled():
    s = torch.randn(3, 4000, generator=torch.Generator().manual_seed(0))
    a = dare(s, p=0.9, generator=torch.Generator().manual_seed(5))
    b = dare(s, p=0.9, generator=torch.Generator().manual_seed(5))
    c = dare(s, p=0.9, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)
    kept = a != 0
    torch.testing.assert_close(a[kept], s[kept] / (1 - 0.9))
    assert abs(kept.float().mean().item() - 0.1) < 0.02


def test_dare_edge_probabilities():
    s = torch.randn(2, 100)
    torch.testing.assert_close(dare(s, p=0.0, generator=torch.Generator().manual_seed(0)), s, rtol=0, atol=0)
    assert torch.count_nonzero(dare(s, p=1.0)) == 0


def test_della_preserves_expectation_and_favors_large_entries():
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(2, 200_000, generator=gen).abs() + 0.1
    out = della(s, density=0.3, epsilon=0.2, generator=torch.Generator().manual_seed(1))
    ratio = out.sum(1) / s.sum(1)
    torch.testing.assert_close(ratio, torch.ones(2), rtol=0, atol=0.02)
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.01
    order = s[0].argsort()
    low, high = kept[0, order[:20_000]].float().mean(), kept[0, order[-20_000:]].float().mean()
    assert 0.08 < low < 0.14 and 0.46 < high < 0.52  # p_keep runs linearly from 0.1 to 0.5
    p_keep = 0.1 + 0.4 * magnitude_ranks(s)
    torch.testing.assert_close(out[kept], (s / p_keep)[kept])
    again = della(s, density=0.3, epsilon=0.2, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, again, rtol=0, atol=0)


def test_breadcrumbs_drops_both_tails():
    s = stack_of(2, 1000, seed=2)
    out = breadcrumbs(s, density=0.8, gamma=0.05)
    for k in range(2):
        order = s[k].abs().argsort()
        assert torch.count_nonzero(out[k, order[-50:]]) == 0  # the 5 % outliers
        assert torch.count_nonzero(out[k, order[:150]]) == 0  # the small 15 %
        torch.testing.assert_close(out[k, order[150:950]], s[k, order[150:950]], rtol=0, atol=0)


def test_breadcrumbs_edges():
    s = stack_of(2, 30, seed=3)
    torch.testing.assert_close(breadcrumbs(s, density=1.0, gamma=0.0), s, rtol=0, atol=0)
    assert torch.count_nonzero(breadcrumbs(s, density=0.0, gamma=0.1)) == 0
    out = breadcrumbs(s, density=0.9, gamma=0.1)  # only the 3 largest of each slice go
    assert torch.count_nonzero(out) == 2 * 27
    assert torch.all((out != 0).sum(1) == 27)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda s: keep_top(s, 1.5), r"density=1\.5 must be within \[0, 1\]"),
        (lambda s: ties(s, density=-0.1), r"density=-0\.1 must be within"),
        (lambda s: dare(s, p=1.2), r"p=1\.2 must be within"),
        (lambda s: dare(s, p=-0.5), r"p=-0\.5 must be within"),
        (lambda s: della(s, density=0.1, epsilon=0.1), "della needs 0 < density - epsilon"),
        (lambda s: della(s, density=0.95, epsilon=0.1), "density \\+ epsilon <= 1"),
        (lambda s: della(s, density=1.3, epsilon=0.1), r"density=1\.3"),
        (lambda s: della(s, density=0.3, epsilon=-0.1), r"della needs epsilon >= 0, got -0\.1"),
        (lambda s: breadcrumbs(s, density=0.9, gamma=-0.1), r"gamma=-0\.1 must be within"),
        (lambda s: breadcrumbs(s, density=2.0), r"density=2\.0 must be within"),
        (lambda s: breadcrumbs(s, density=0.95, gamma=0.1), r"density \+ gamma <= 1"),
    ],
)
def test_bad_fractions(call, message):
    with pytest.raises(AdamergeError, match=message):
        call(torch.randn(2, 10))


def tiny_task_vectors() -> TaskVectors:
    gen = torch.Generator().manual_seed(0)
    stacks = {"a.weight": torch.randn(3, 8, 4, generator=gen), "a.bias": torch.randn(3, 8, generator=gen)}
    infos = {
        "a.weight": TensorInfo("a.weight", (8, 4), "matrix", 1),
        "a.bias": TensorInfo("a.bias", (8,), "bias", None),
    }
    return TaskVectors(["x", "y", "z"], infos, stacks)


def test_preprocess_named_and_seeded():
    tv = tiny_task_vectors()
    assert preprocess(tv, None) is tv and preprocess(tv, "none") is tv
    a, b = preprocess(tv, "dare", seed=3, p=0.5), preprocess(tv, "dare", seed=3, p=0.5)
    c = preprocess(tv, "dare", seed=4, p=0.5)
    assert all(torch.equal(a.stacks[n], b.stacks[n]) for n in tv.stacks)
    assert not all(torch.equal(a.stacks[n], c.stacks[n]) for n in tv.stacks)
    t = preprocess(tv, "ties", density=0.5, scope="tensor")
    assert t.experts == tv.experts and t.infos == tv.infos
    torch.testing.assert_close(t.stacks["a.weight"], ties(tv.stacks["a.weight"], density=0.5))
    with pytest.raises(AdamergeError, match="pool.preprocess.method='magic'; choose from none, ties"):
        preprocess(tv, "magic")
    with pytest.raises(AdamergeError, match="pool.preprocess: .*'densty'"):
        preprocess(tv, "ties", densty=0.5)


def test_norms_are_frobenius_per_expert():
    tv = tiny_task_vectors()
    expected = torch.stack([torch.cat([s[k].flatten() for s in tv.stacks.values()]).norm() for k in range(3)])
    torch.testing.assert_close(tv.norms(), expected)
