"""The box's per-query RDP bound against the exact divergence of the implemented mixture, and its solver."""

import itertools
import math

import mpmath
import numpy as np
import pytest
import torch

from privtune.common.errors import PrivtuneError
from privtune.common.pmixed.accountant import PMixedBudget, best_budget
from privtune.common.pmixed.box import ROUNDING, Box, project_box
from privtune.common.pmixed.box_bound import mixing_weight, per_query_rdp, solve_width
from privtune.common.pmixed.divergence import as_distribution
from privtune.common.pmixed.mechanism import subset_distribution


def _released_law(raw_members: torch.Tensor, public: torch.Tensor, box: Box, q: float) -> np.ndarray:
    """Σ_S P(S) · law of the float64 vector ``next_token`` samples for S, every S enumerated."""
    p0 = as_distribution(public, "p0")
    projected = project_box(raw_members, p0, box)
    n = len(raw_members)
    law = np.zeros(len(public))
    for mask in itertools.product([False, True], repeat=n):
        k = sum(mask)
        dist = subset_distribution(projected, p0, np.flatnonzero(mask)).numpy()
        law += q**k * (1 - q) ** (n - k) * dist / dist.sum()
    return law


def _renyi(p: np.ndarray, r: np.ndarray, alpha: float) -> float:
    return math.log(float(np.sum(p**alpha * r ** (1 - alpha)))) / (alpha - 1)


def _mp_bound(alpha: float, width: float, q: float, n: int) -> float:
    """The theorem of box_bound.py, straight from its formula in 60-digit arithmetic."""
    mpmath.mp.dps = 60
    q = mpmath.mpf(q)
    kappa = (1 - (1 - q) ** n) / n
    u = (1 + kappa * mpmath.expm1(mpmath.mpf(width))) * mpmath.exp(2 * mpmath.mpf(ROUNDING))
    return float(mpmath.log((u**alpha + u ** (1 - alpha)) / (1 + u)) / (alpha - 1))


def _vertex_rows(vocab: int, rng: np.random.Generator, count: int) -> torch.Tensor:
    """Point masses and two-token splits: the projection sends them to (near) vertices of the box."""
    rows = np.zeros((count, vocab))
    for row in rows:
        tokens = rng.choice(vocab, size=min(2, vocab), replace=False)
        row[tokens[0]] = 1.0
        if rng.random() < 0.3:
            row[tokens[1]] = rng.random()
    return torch.from_numpy(rows)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("q", [0.3, 1.0])
@pytest.mark.parametrize("vocab", [2, 3, 4])
def test_bound_dominates_the_exact_divergence_of_the_implemented_mixture(n, q, vocab):
    """Random and extreme members and neighbours (member 0 replaced), every S enumerated, both orderings."""
    rng = np.random.default_rng(100 * n + 10 * vocab + int(q * 10))
    worst = 0.0
    for trial in range(25):
        public = torch.from_numpy(rng.dirichlet(np.full(vocab, 1.0 if trial % 2 else 0.3)))
        box = Box(*rng.uniform(0.05, 1.5, size=2))
        others = (
            _vertex_rows(vocab, rng, n - 1)
            if trial % 3
            else torch.from_numpy(rng.dirichlet(np.full(vocab, 0.5), size=n - 1))
        )
        mine, theirs = _vertex_rows(vocab, rng, 2) if trial % 4 else torch.from_numpy(rng.dirichlet(np.ones(vocab), 2))
        world = _released_law(torch.cat([mine[None], others]), public, box, q)
        neighbour = _released_law(torch.cat([theirs[None], others]), public, box, q)
        for alpha in (1.5, 2.0, 3.0, 8.0):
            bound = per_query_rdp(alpha, box.width, q, n)
            exact = max(_renyi(world, neighbour, alpha), _renyi(neighbour, world, alpha))
            assert exact <= bound, (trial, alpha, exact, bound)
            worst = max(worst, exact / bound)
    assert worst > 0.05  # the extreme members do move the law: the comparison is not vacuous


@pytest.mark.parametrize("alpha", [1.5, 2.0, 4.0, 16.0])
def test_bound_is_attained_by_one_member_between_opposite_vertices(alpha):
    """N = 1, q = 1, two tokens, e^b + e^-a = 2: the released laws are the box's two vertices, the ratio
    takes exactly the values U and 1/U, and the divergence equals the bound up to the projection's margin."""
    upper = 0.5
    lower = -math.log(2 - math.exp(upper))
    pi = (1 - math.exp(-lower)) / (math.exp(upper) - math.exp(-lower))
    public = torch.tensor([pi, 1 - pi], dtype=torch.float64)
    box = Box(lower, upper)
    world = _released_law(torch.tensor([[1.0, 0.0]], dtype=torch.float64), public, box, 1.0)
    neighbour = _released_law(torch.tensor([[0.0, 1.0]], dtype=torch.float64), public, box, 1.0)
    bound = per_query_rdp(alpha, box.width, 1.0, 1)
    for exact in (_renyi(world, neighbour, alpha), _renyi(neighbour, world, alpha)):
        assert bound * (1 - 1e-4) <= exact <= bound


@pytest.mark.parametrize(
    "alpha, width, q, n", [(1.5, 0.3, 1.0, 32), (4, 0.96, 1.0, 32), (20, 0.06, 0.5, 8), (2, 5.0, 0.01, 3)]
)
def test_per_query_rdp_is_its_formula_in_high_precision(alpha, width, q, n):
    assert per_query_rdp(alpha, width, q, n) == pytest.approx(_mp_bound(alpha, width, q, n), rel=1e-10)


def test_mixing_weight_is_one_over_n_at_q_one_and_tends_to_q():
    assert mixing_weight(1.0, 16) == 1 / 16
    assert mixing_weight(1e-6, 10) == pytest.approx(1e-6, rel=1e-4)
    assert mixing_weight(0.5, 16) == pytest.approx((1 - 0.5**16) / 16, rel=1e-15)


@pytest.mark.parametrize(
    "eps, alpha, q, n, T", [(8.0, 4, 1.0, 32, 1024), (1.0, 20, 1.0, 8, 1024), (3.0, 6.5, 0.5, 16, 100), (8, 4, 1, 1, 1)]
)
def test_the_solved_width_never_exceeds_the_budget_and_is_the_largest(eps, alpha, q, n, T):
    budget = PMixedBudget(eps, 1e-5, alpha, T, q, n, projection="box")
    width = budget.width()
    assert per_query_rdp(alpha, width, q, n) <= budget.rdp_per_query()
    assert per_query_rdp(alpha, width * (1 + 1e-9), q, n) > budget.rdp_per_query()
    assert budget.epsilon_after(T) <= eps and budget.epsilon_after(T) == pytest.approx(eps, rel=1e-9)
    box = budget.box()
    assert box.upper == pytest.approx(budget.split * width) and box.width == pytest.approx(width, rel=1e-15)


def test_the_widths_the_benchmark_relies_on():
    """N = 32 members at epsilon 8 over 1024 queries: about 0.96 nats per token, about 0.59 for N = 16."""
    assert best_budget(8.0, 1e-5, 1024, 1.0, 32).width() == pytest.approx(0.9595, abs=1e-3)
    assert best_budget(8.0, 1e-5, 1024, 1.0, 16).width() == pytest.approx(0.5906, abs=1e-3)


def test_best_budget_takes_the_order_of_widest_box_among_the_feasible():
    chosen = best_budget(1.0, 1e-5, 1024, 1.0, 8, orders=(2, 3, 20, 64))
    widths = {}
    for alpha in (2, 3, 20, 64):
        try:
            widths[alpha] = PMixedBudget(1.0, 1e-5, alpha, 1024, 1.0, 8, "box").width()
        except PrivtuneError:
            continue
    assert 2 not in widths and chosen.alpha == max(widths, key=widths.get)
    with pytest.raises(PrivtuneError, match="no Rényi order"):
        best_budget(0.01, 1e-5, 1024, 1.0, 8, orders=(2, 3))


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("q", 0.0, "q must be in"),
        ("q", 1.2, "q must be in"),
        ("q", math.nan, "q must be in"),
        ("alpha", 1.0, "alpha > 1"),
        ("alpha", math.nan, "alpha > 1"),
        ("split", 0.0, "split"),
        ("split", 1.0, "split"),
        ("projection", "ball", "unknown PMixED projection"),
    ],
)
def test_bad_box_budgets_are_refused(field, value, match):
    params = dict(epsilon=8.0, delta=1e-5, alpha=4, T=1024, q=1.0, n_members=8, projection="box", split=0.5)
    with pytest.raises(PrivtuneError, match=match):
        PMixedBudget(**{**params, field: value})


def test_a_budget_below_the_rounding_cost_is_refused_and_projections_do_not_mix():
    with pytest.raises(PrivtuneError, match="rounding"):
        solve_width(1e-20, 4.0, 1.0, 8)
    box = PMixedBudget(8.0, 1e-5, 4, 1024, 1.0, 8, projection="box")
    with pytest.raises(PrivtuneError, match="box projection, not the renyi"):
        box.beta()
    with pytest.raises(PrivtuneError, match="renyi projection, not the box"):
        PMixedBudget(8.0, 1e-5, 3, 1024, 0.1, 8).width()
    with pytest.raises(PrivtuneError, match=r"q must be in \(0, 1\)"):
        PMixedBudget(8.0, 1e-5, 3, 1024, 1.0, 8)  # q = 1 stays refused for the Rényi ball


def test_a_box_with_a_side_too_narrow_is_refused_when_the_budget_is_made():
    with pytest.raises(PrivtuneError, match="lower log-width"):
        PMixedBudget(1.0, 1e-5, 20, 1024, 1.0, 2, "box", split=1 - 1e-9)
