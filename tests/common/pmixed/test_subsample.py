"""Poisson subsampling: sets (no duplicates), per-member rate q, independence, Binomial sizes."""

import numpy as np
from scipy import stats

from privtune.common.pmixed.subsample import poisson_subsample, secure_rng

N, Q, DRAWS = 80, 0.03, 20000
ALPHA = 1e-3  # family-wise significance of each statistical test below (Bonferroni inside)


def _draws(seed=0):
    rng = secure_rng(seed)
    return [poisson_subsample(N, Q, rng) for _ in range(DRAWS)]


def test_sets_are_sorted_unique_and_in_range():
    for s in _draws():
        assert s.size <= N
        assert np.all(np.diff(s) > 0)  # strictly increasing: no duplicates
        assert s.size == 0 or (s[0] >= 0 and s[-1] < N)


def test_each_member_included_at_rate_q():
    counts = np.zeros(N, dtype=int)
    for s in _draws(1):
        counts[s] += 1
    pvalues = [stats.binomtest(int(c), DRAWS, Q).pvalue for c in counts]
    assert min(pvalues) > ALPHA / N


def test_members_independent_and_sizes_binomial():
    draws = _draws(2)
    incl = np.zeros((DRAWS, N), dtype=bool)
    for row, s in zip(incl, draws):
        row[s] = True
    # |S| ~ Binomial(N, q): chi-square over sizes 0..6 and a tail bin.
    sizes = incl.sum(axis=1)
    observed = np.array([np.sum(sizes == k) for k in range(7)] + [np.sum(sizes >= 7)])
    pmf = stats.binom.pmf(np.arange(7), N, Q)
    expected = DRAWS * np.append(pmf, 1 - pmf.sum())
    assert stats.chisquare(observed, expected).pvalue > ALPHA / 4
    # Pairwise independence on a few pairs (2x2 contingency, Fisher exact test).
    pairs = [(0, 1), (0, 79), (17, 18), (40, 63)]
    for a, b in pairs:
        table = [
            [np.sum(incl[:, a] & incl[:, b]), np.sum(incl[:, a] & ~incl[:, b])],
            [np.sum(~incl[:, a] & incl[:, b]), np.sum(~incl[:, a] & ~incl[:, b])],
        ]
        assert stats.fisher_exact(table).pvalue > ALPHA / 4 / len(pairs)


def test_secure_seed_differs_explicit_seed_repeats():
    assert secure_rng().random() != secure_rng().random()
    assert secure_rng(5).random() == secure_rng(5).random()


def test_edge_rates():
    rng = secure_rng(3)
    assert poisson_subsample(10, 0.0, rng).size == 0
    assert np.array_equal(poisson_subsample(10, 1.0, rng), np.arange(10))
    assert poisson_subsample(0, 0.5, rng).size == 0
