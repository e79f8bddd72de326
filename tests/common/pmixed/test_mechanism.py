"""One query end to end: the released tokens follow the exact PMixED law (chi-square, fixed seed).

The token sampler's law is checked exactly (rational arithmetic), not by sampling: every output of
positive float64 probability has exactly that probability, however small.
"""

import dataclasses
import itertools
from fractions import Fraction

import numpy as np
import pytest
import torch
from scipy import stats

from privtune.common.pmixed.accountant import PMixedBudget
from privtune.common.pmixed.box import project_box
from privtune.common.pmixed.mechanism import (
    TokenRelease,
    buckets,
    mixture_distribution,
    next_token,
    sample_token,
    subset_distribution,
    uniform_below,
)
from privtune.common.pmixed.projection import project
from privtune.common.pmixed.subsample import secure_rng

SIGNIFICANCE = 1e-3  # each chi-square test below rejects a correct sampler with this probability


def _exact_law(members, public, q, alpha, beta):
    """Σ_S P(S) · mean of the projected members of S (p0 for S = ∅), by enumerating all subsets."""
    projected = project(members, public, alpha, beta).mixed.numpy()
    law = np.zeros(len(public))
    for mask in itertools.product([False, True], repeat=len(members)):
        k = sum(mask)
        weight = q**k * (1 - q) ** (len(members) - k)
        law += weight * (public if k == 0 else projected[np.array(mask)].mean(axis=0))
    return law


def test_sample_token_matches_distribution_and_skips_zeros():
    probs = torch.tensor([0.5, 0.0, 0.2, 0.0, 0.3], dtype=torch.float64)
    rng = secure_rng(10)
    draws = np.array([sample_token(probs, rng) for _ in range(20000)])
    counts = np.bincount(draws, minlength=5)
    assert counts[1] == 0 and counts[3] == 0
    assert stats.chisquare(counts[[0, 2, 4]], 20000 * np.array([0.5, 0.2, 0.3])).pvalue > SIGNIFICANCE


def test_released_tokens_follow_the_pmixed_law():
    rng_data = np.random.default_rng(11)
    vocab, n = 6, 3
    public = rng_data.dirichlet(np.full(vocab, 2.0))
    members = rng_data.dirichlet(np.full(vocab, 0.3), size=n)
    # A generous budget (β ≈ 0.15, λ ≈ 0.3-0.6) so the members move the law visibly: with 3000 draws
    # the test rejects the public-only law and the unprojected-members law with probability ≈ 1.
    budget = PMixedBudget(epsilon=8.0, delta=1e-5, alpha=3, T=2, q=0.5, n_members=n)
    law = _exact_law(members, public, budget.q, budget.alpha, budget.beta())
    assert 0.2 < project(members, public, 3, budget.beta()).lambdas.min() < 0.9

    rng = secure_rng(12)
    draws = 3000
    tokens = [next_token(public, members, budget, rng).token for _ in range(draws)]
    counts = np.bincount(tokens, minlength=vocab)
    assert stats.chisquare(counts, draws * law).pvalue > SIGNIFICANCE


def test_every_member_is_projected_whatever_s_and_the_release_carries_only_token_and_rdp():
    """Constant work: the caller hands over all N members each query; a wrong count is refused."""
    public = np.full(5, 0.2)
    members = np.random.default_rng(13).dirichlet(np.ones(5), size=10)
    budget = PMixedBudget(epsilon=8.0, delta=1e-5, alpha=3, T=1024, q=0.3, n_members=10)
    rng = secure_rng(14)
    releases = [next_token(public, members, budget, rng) for _ in range(50)]
    assert {f.name for f in dataclasses.fields(TokenRelease)} == {"token", "rdp", "alpha"}
    assert all(r.rdp == budget.rdp_per_query() and r.alpha == 3 for r in releases)
    with pytest.raises(ValueError, match="every member"):
        next_token(public, members[:3], budget, rng)


def exact_law(probs: np.ndarray) -> list[Fraction]:
    """The law sample_token draws from, in exact rationals: bucket weight share x mantissa share."""
    b = buckets(probs)
    grand = sum(b.totals)
    law = [Fraction(0)] * len(probs)
    bounds = [*b.starts.tolist(), len(b.support)]
    for bucket, total in enumerate(b.totals):
        members = range(bounds[bucket], bounds[bucket + 1])
        in_bucket = sum(int(b.mantissas[i]) for i in members)
        for i in members:
            law[int(b.support[i])] = Fraction(total, grand) * Fraction(int(b.mantissas[i]), in_bucket)
    return law


@pytest.mark.parametrize("seed", range(5))
def test_sampler_law_is_exactly_the_float_vector_normalised(seed):
    """Spreads far beyond 2^-53 (down to subnormals), exact zeros, repeated exponents."""
    rng = np.random.default_rng(seed)
    probs = np.exp(rng.uniform(-745, 0, size=300)) * rng.integers(0, 2, size=300)
    probs[:3] = [1.0, 2.0**-1074, 0.5]
    total = sum(Fraction(float(p)) for p in probs)
    assert exact_law(probs) == [Fraction(float(p)) / total for p in probs]


def test_uniform_below_is_uniform_for_huge_bounds():
    rng = secure_rng(3)
    n = (1 << 1100) + 12345
    draws = [uniform_below(n, rng) for _ in range(4000)]
    assert all(0 <= d < n for d in draws)
    top = sum(d >= n // 2 for d in draws)
    assert stats.binomtest(top, 4000, 0.5).pvalue > SIGNIFICANCE
    assert stats.chisquare(np.bincount([d % 7 for d in draws], minlength=7)).pvalue > SIGNIFICANCE


def test_empty_set_releases_public_distribution():
    public = torch.tensor([0.1, 0.2, 0.7])
    for empty in (None, np.zeros((0, 3))):
        assert torch.allclose(mixture_distribution(empty, public, 3, 0.1), public.double())


def test_bad_member_shape_is_rejected():
    budget = PMixedBudget(epsilon=8.0, delta=1e-5, alpha=3, T=1024, q=0.99, n_members=3)
    with pytest.raises(ValueError):
        next_token(np.full(4, 0.25), np.full((3, 5), 0.2), budget, secure_rng(15))


@pytest.mark.parametrize("q", [1.0, 0.5])
def test_released_tokens_follow_the_box_law(q):
    """The box budget's query: every member projected into the box, the mean over S sampled exactly."""
    rng_data = np.random.default_rng(21)
    vocab, n = 6, 3
    public = rng_data.dirichlet(np.full(vocab, 2.0))
    members = rng_data.dirichlet(np.full(vocab, 0.3), size=n)
    budget = PMixedBudget(epsilon=8.0, delta=1e-5, alpha=4, T=2, q=q, n_members=n, projection="box", split=0.7)
    p0 = torch.as_tensor(public) / float(np.sum(public))
    projected = project_box(members, p0, budget.box())
    law = np.zeros(vocab)
    for mask in itertools.product([False, True], repeat=n):
        k = sum(mask)
        dist = subset_distribution(projected, p0, np.flatnonzero(mask)).numpy()
        law += q**k * (1 - q) ** (n - k) * dist / dist.sum()
    assert np.abs(law - public).max() > 0.05  # the members move the law visibly

    rng = secure_rng(22)
    draws = 3000
    releases = [next_token(public, members, budget, rng) for _ in range(draws)]
    assert {(r.rdp, r.alpha) for r in releases} == {(budget.rdp_per_query(), 4)}
    counts = np.bincount([r.token for r in releases], minlength=vocab)
    assert stats.chisquare(counts, draws * law).pvalue > SIGNIFICANCE
