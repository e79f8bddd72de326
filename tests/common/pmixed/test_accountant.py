"""Accountant: the budget conversion, β recomputed independently, and the bound against the real mechanism."""

import itertools
import math

import mpmath
import numpy as np
import pytest

from privtune.common.errors import PrivtuneError
from privtune.common.pmixed.accountant import PMixedBudget, epsilon_spent, per_query_rdp
from privtune.common.pmixed.projection import project

DEFAULTS = dict(epsilon=8.0, delta=1e-5, alpha=3, T=1024, q=0.03, n_members=80)
BUDGETS = [
    DEFAULTS,
    dict(epsilon=6.0, delta=1e-5, alpha=4, T=100, q=0.1, n_members=8),
    dict(epsilon=10.0, delta=1e-3, alpha=2, T=10, q=0.05, n_members=30),
    dict(epsilon=4.0, delta=1e-5, alpha=5, T=5000, q=0.01, n_members=200),
    dict(epsilon=20.0, delta=1e-8, alpha=8, T=64, q=0.2, n_members=3),
    dict(epsilon=1000.0, delta=1e-5, alpha=3, T=1, q=0.03, n_members=80),  # β past e^x overflow
]


def _mp_bound(alpha, beta, q, n):
    """The theorem of accountant.py evaluated term by term in 60-digit arithmetic."""
    mpmath.mp.dps = 60
    q, beta = mpmath.mpf(q), mpmath.mpf(beta)
    pi0 = (1 - q) ** n
    kappa = (1 - pi0) / n
    total = 1 + mpmath.fsum(
        mpmath.binomial(alpha, ell) * 2**ell * kappa**ell * pi0 ** (1 - ell) * mpmath.expm1((ell - 1) * alpha * beta)
        for ell in range(2, alpha + 1)
    )
    return float(mpmath.log(total) / (alpha - 1))


def test_budget_total_is_the_shared_conversion():
    expected = 8 - math.log(2 / 3) + (math.log(1e-5) + math.log(3)) / 2
    assert PMixedBudget(**DEFAULTS).rdp_total() == pytest.approx(expected, rel=1e-15)


@pytest.mark.parametrize(
    "field, value",
    [
        ("epsilon", math.inf),
        ("epsilon", math.nan),
        ("delta", math.nan),
        ("alpha", math.inf),
        ("alpha", math.nan),
        ("T", math.inf),
        ("T", math.nan),
        ("q", math.nan),
        ("n_members", math.inf),
    ],
)
def test_every_numeric_input_is_finite_and_in_range(field, value):
    with pytest.raises(PrivtuneError, match=field if field != "T" else "query budget T"):
        PMixedBudget(**{**DEFAULTS, field: value})


@pytest.mark.parametrize("params", BUDGETS)
def test_beta_meets_per_query_budget_recomputed_with_mpmath(params):
    budget = PMixedBudget(**params)
    beta = budget.beta()
    assert beta > 0
    recomputed = _mp_bound(budget.alpha, beta, budget.q, budget.n_members)
    assert recomputed == pytest.approx(budget.rdp_per_query(), rel=1e-12)
    assert per_query_rdp(budget.alpha, beta, budget.q, budget.n_members) <= budget.rdp_per_query()
    assert per_query_rdp(budget.alpha, beta * (1 + 1e-9), budget.q, budget.n_members) > budget.rdp_per_query()


@pytest.mark.parametrize("params", BUDGETS)
def test_T_queries_spend_exactly_epsilon(params):
    budget = PMixedBudget(**params)
    spent = epsilon_spent(budget.T, budget.alpha, budget.beta(), budget.q, budget.delta, budget.n_members)
    assert spent == pytest.approx(budget.epsilon, rel=1e-12)
    assert spent <= budget.epsilon * (1 + 1e-15)
    assert budget.epsilon_after(budget.T // 2) < budget.epsilon


def test_defaults_beta_value():
    assert PMixedBudget(**DEFAULTS).beta() == pytest.approx(0.0855517189, rel=1e-8)


def _mechanism_law(members, public, q):
    """Exact law of the released token: Σ_S P(S) · mean_{j∈S} members[j] (public when S = ∅)."""
    n = len(members)
    law = np.zeros_like(public)
    for mask in itertools.product([0, 1], repeat=n):
        k = sum(mask)
        weight = q**k * (1 - q) ** (n - k)
        law += weight * (public if k == 0 else members[np.array(mask, dtype=bool)].mean(axis=0))
    return law


def _renyi(p, r, alpha):
    return math.log(float(np.sum(p**alpha * r ** (1 - alpha)))) / (alpha - 1)


def _ball_pair(alpha, radius, eps):
    """Two distributions inside the two-sided α-ball of radius ``radius`` around p0 = [eps, 1-eps] that
    are far apart from each other: P puts c-weight where p0 is tiny, P' almost none."""
    c = 0.4 * math.expm1((alpha - 1) * radius)
    p0 = np.array([eps, 1 - eps])
    big = (c * eps ** (alpha - 1)) ** (1 / alpha)
    small = (eps**alpha / c) ** (1 / (alpha - 1))
    return p0, np.array([big, 1 - big]), np.array([small, 1 - small])


def test_members_in_the_ball_can_be_arbitrarily_far_apart():
    # Why the bound needs the S = ∅ floor: order-α closeness to p0 does not bound D_α(P||P'),
    # so a per-|S| bound like ln((n-1)/n + e^((α-1)4αβ)/n)/(α-1) for |S| = n ≥ 2 is not valid.
    alpha, beta = 3, 0.0855
    for eps in (1e-6, 1e-12, 1e-18):
        p0, far, near = _ball_pair(alpha, alpha * beta, eps)
        proj = project(np.stack([far, near]), p0, alpha, beta)
        assert proj.lambdas.tolist() == [1.0, 1.0]  # both already inside the ball
    assert _renyi(far, near, alpha) > 4 * alpha * beta * 5


@pytest.mark.parametrize("alpha,q,n", [(2, 0.3, 1), (3, 0.3, 3), (3, 0.03, 4), (4, 0.5, 2), (5, 0.2, 4)])
def test_bound_dominates_exact_mechanism(alpha, q, n):
    """Brute force: the exact per-query Rényi divergence between neighbouring ensembles never exceeds
    the bound, on random members and on the adversarial far-apart pair with the others next to P'."""
    rng = np.random.default_rng(alpha * 100 + n)
    beta = 0.1
    bound = per_query_rdp(alpha, beta, q, n)
    worst = 0.0
    cases = []
    for _ in range(30):
        public = rng.dirichlet(np.full(6, 0.5))
        raw = rng.dirichlet(np.full(6, 0.2), size=n + 1)
        cases.append((public, project(raw, public, alpha, beta).mixed.numpy()))
    for eps in (1e-6, 1e-12):
        p0, far, near = _ball_pair(alpha, alpha * beta, eps)
        cases.append((p0, np.stack([near] * (n - 1) + [far, near])))
    for public, members in cases:
        world = _mechanism_law(members[:n], public, q)  # member n-1 holds its own data
        neighbour = _mechanism_law(np.concatenate([members[: n - 1], members[n:]]), public, q)  # replaced
        worst = max(worst, _renyi(world, neighbour, alpha), _renyi(neighbour, world, alpha))
    assert worst <= bound
    assert worst > 1e-3 * bound  # the check is not vacuous


def test_rejects_unusable_parameters():
    with pytest.raises(PrivtuneError):
        PMixedBudget(**{**DEFAULTS, "alpha": 2.5})
    with pytest.raises(PrivtuneError):
        PMixedBudget(**{**DEFAULTS, "q": 1.0})
    with pytest.raises(PrivtuneError):
        PMixedBudget(**{**DEFAULTS, "epsilon": 0.1, "delta": 1e-10})
    with pytest.raises(PrivtuneError):
        PMixedBudget(**{**DEFAULTS, "T": 0})
