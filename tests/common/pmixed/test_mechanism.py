"""One query end to end: the released tokens follow the exact PMixED law (chi-square, fixed seed)."""

import dataclasses
import itertools

import numpy as np
import pytest
import torch
from scipy import stats

from privtune.common.pmixed.accountant import PMixedBudget
from privtune.common.pmixed.mechanism import TokenRelease, mixture_distribution, next_token, sample_token
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
    tokens = [next_token(public, lambda idx: members[idx], budget, rng).token for _ in range(draws)]
    counts = np.bincount(tokens, minlength=vocab)
    assert stats.chisquare(counts, draws * law).pvalue > SIGNIFICANCE


def test_members_are_queried_only_for_the_sampled_set():
    public = np.full(5, 0.2)
    members = np.random.default_rng(13).dirichlet(np.ones(5), size=10)
    budget = PMixedBudget(epsilon=8.0, delta=1e-5, alpha=3, T=1024, q=0.3, n_members=10)
    seen = []

    def member_probs(idx):
        seen.append(idx.copy())
        return members[idx]

    rng = secure_rng(14)
    releases = [next_token(public, member_probs, budget, rng) for _ in range(200)]
    assert all(len(s) > 0 and np.all(np.diff(s) > 0) for s in seen)
    assert len(seen) < 200  # S was empty sometimes, and then no member ran
    assert {f.name for f in dataclasses.fields(TokenRelease)} == {"token", "rdp", "alpha"}
    assert all(r.rdp == budget.rdp_per_query() and r.alpha == 3 for r in releases)


def test_empty_set_releases_public_distribution():
    public = torch.tensor([0.1, 0.2, 0.7])
    for empty in (None, np.zeros((0, 3))):
        assert torch.allclose(mixture_distribution(empty, public, 3, 0.1), public.double())


def test_bad_member_shape_is_rejected():
    budget = PMixedBudget(epsilon=8.0, delta=1e-5, alpha=3, T=1024, q=0.99, n_members=3)
    with pytest.raises(ValueError):
        next_token(np.full(4, 0.25), lambda idx: np.full((1, 4), 0.25), budget, secure_rng(15))
