"""Rényi divergence against direct high-precision sums and its textbook properties."""

import math

import mpmath
import numpy as np
import pytest
import torch

from privtune.common.pmixed.divergence import renyi_divergence, symmetric_renyi_divergence


def _mp_renyi(p, q, alpha):
    """Direct definition in 50-digit arithmetic, from the raw entries (independent of log space)."""
    mpmath.mp.dps = 50
    total = mpmath.fsum(mpmath.mpf(a) ** alpha * mpmath.mpf(b) ** (1 - alpha) for a, b in zip(p, q) if a > 0)
    return float(mpmath.log(total) / (alpha - 1))


@pytest.mark.parametrize("alpha", [1.5, 2.0, 3.0, 7.25])
def test_matches_direct_sum_batched(alpha):
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.full(50, 0.3), size=4)
    q = rng.dirichlet(np.full(50, 2.0))
    got = renyi_divergence(p, q, alpha)
    assert got.shape == (4,) and got.dtype == torch.float64
    for row, value in zip(p, got):
        assert value.item() == pytest.approx(_mp_renyi(row, q, alpha), rel=1e-12, abs=1e-14)


def test_tiny_probabilities_do_not_overflow():
    # softmax tails reach 1e-300; P^α Q^(1-α) = 1e-200 * 1e+300 must not become inf/0 inside.
    p = np.array([1e-100, 1.0 - 1e-100 - 1e-300, 1e-300])
    q = np.array([1e-300, 1.0 - 2e-300, 1e-300])
    got = renyi_divergence(p, q, 3.0).item()
    assert math.isfinite(got)
    assert got == pytest.approx(_mp_renyi(p, q, 3.0), rel=1e-12)


def test_zeros_in_p_and_q():
    p = torch.tensor([0.5, 0.5, 0.0])
    q = torch.tensor([0.25, 0.75, 0.0])  # shared zero: contributes nothing, no nan
    assert renyi_divergence(p, q, 3.0).item() == pytest.approx(_mp_renyi([0.5, 0.5], [0.25, 0.75], 3.0), rel=1e-12)
    assert renyi_divergence(torch.tensor([0.5, 0.5, 0.0]), torch.tensor([1.0, 0.0, 0.0]), 2.0).item() == math.inf
    point_mass = renyi_divergence(torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.5]), 2.0)
    assert point_mass.item() == pytest.approx(math.log(2))


def test_identity_and_monotone_in_order():
    rng = np.random.default_rng(1)
    p, q = rng.dirichlet(np.ones(30), size=2)
    assert renyi_divergence(p, p, 3.0).item() == pytest.approx(0.0, abs=1e-15)
    values = [renyi_divergence(p, q, a).item() for a in (1.1, 1.5, 2, 3, 5, 10)]
    assert all(b >= a - 1e-15 for a, b in zip(values, values[1:]))


def test_symmetric_is_max_of_both_directions():
    rng = np.random.default_rng(2)
    p, q = rng.dirichlet(np.full(20, 0.5), size=2)
    sym = symmetric_renyi_divergence(p, q, 3.0).item()
    assert sym == max(renyi_divergence(p, q, 3.0).item(), renyi_divergence(q, p, 3.0).item())


def test_rejects_order_at_most_one():
    with pytest.raises(ValueError):
        renyi_divergence([0.5, 0.5], [0.5, 0.5], 1.0)
