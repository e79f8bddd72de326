"""Projection onto the α·β Rényi ball: feasibility, maximality, monotonicity, brute force, oracles."""

import math

import numpy as np
import pytest
import torch

from privtune.common.pmixed.projection import DEFAULT_TOL, FEASIBILITY_SLACK, project


def _direct_constraint(lam, p, p0, alpha):
    """max of both divergences by the plain formula in numpy (independent of the module's log-space code)."""
    m = lam * p + (1 - lam) * p0
    fwd = np.log(np.sum(m**alpha * p0 ** (1 - alpha))) / (alpha - 1)
    rev = np.log(np.sum(p0**alpha * m ** (1 - alpha))) / (alpha - 1)
    return max(fwd, rev)


def _members(seed, k, vocab, concentration):
    rng = np.random.default_rng(seed)
    p0 = rng.dirichlet(np.full(vocab, 1.0))
    return rng.dirichlet(np.full(vocab, concentration), size=k), p0


@pytest.mark.parametrize("alpha,beta", [(2.0, 0.05), (3.0, 0.0856), (3.0, 0.01), (4.5, 0.2)])
def test_feasible_and_maximal(alpha, beta):
    p, p0 = _members(0, 12, 40, 0.2)
    proj = project(p, p0, alpha, beta)
    radius = alpha * beta
    for lam, row in zip(proj.lambdas.tolist(), p):
        assert 0.0 <= lam <= 1.0
        assert _direct_constraint(lam, row, p0, alpha) <= radius
        if lam < 1.0:  # λ + tol is already outside the ball (tiny margin: the module's own slack)
            assert _direct_constraint(min(1.0, lam + DEFAULT_TOL), row, p0, alpha) > radius - 2 * FEASIBILITY_SLACK
    assert (proj.lambdas < 1).any()
    lam = proj.lambdas[:, None]
    assert torch.allclose(proj.mixed, lam * torch.as_tensor(p) + (1 - lam) * torch.as_tensor(p0))


def test_lambda_one_when_member_already_feasible():
    p0 = np.full(10, 0.1)
    near = p0 * np.linspace(0.99, 1.01, 10)
    proj = project(near[None, :], p0, 3.0, 0.1)
    assert proj.lambdas.item() == 1.0
    assert np.allclose(proj.mixed[0].numpy(), near / near.sum(), rtol=0, atol=1e-15)


def test_divergence_is_monotone_in_lambda():
    # The bisection is only correct if both divergences grow with λ; check it on sharp and flat members.
    for seed, concentration in [(1, 0.05), (2, 0.5), (3, 5.0)]:
        p, p0 = _members(seed, 4, 30, concentration)
        grid = np.linspace(0, 1, 401)
        for row in p:
            for alpha in (2.0, 3.0, 6.0):
                mixes = grid[:, None] * row + (1 - grid[:, None]) * p0
                fwd = np.log(np.sum(mixes**alpha * p0 ** (1 - alpha), axis=1)) / (alpha - 1)
                rev = np.log(np.sum(p0**alpha * mixes ** (1 - alpha), axis=1)) / (alpha - 1)
                assert np.all(np.diff(fwd) >= -1e-12) and np.all(np.diff(rev) >= -1e-12)


def test_agrees_with_brute_force_grid():
    p, p0 = _members(4, 6, 5, 0.3)
    alpha, beta = 3.0, 0.05
    grid = np.linspace(0, 1, 20001)
    step = grid[1]
    proj = project(p, p0, alpha, beta)
    for lam, row in zip(proj.lambdas.tolist(), p):
        mixes = grid[:, None] * row + (1 - grid[:, None]) * p0
        fwd = np.log(np.sum(mixes**alpha * p0 ** (1 - alpha), axis=1)) / (alpha - 1)
        rev = np.log(np.sum(p0**alpha * mixes ** (1 - alpha), axis=1)) / (alpha - 1)
        best = grid[np.maximum(fwd, rev) <= alpha * beta].max()
        assert best - 1e-12 <= lam < best + step + DEFAULT_TOL


def test_alpha2_forward_closed_form_oracle():
    # α = 2: D_2(p̄||p0) = ln(1 + λ² χ²(p||p0)), so the forward constraint alone gives λ_f in closed form.
    p, p0 = _members(5, 10, 25, 0.4)
    beta = 0.04
    proj = project(p, p0, 2.0, beta)
    checked = 0
    for lam, row in zip(proj.lambdas.tolist(), p):
        chi2 = np.sum((row - p0) ** 2 / p0)
        lam_f = min(1.0, math.sqrt(math.expm1(2 * beta) / chi2))
        assert lam <= lam_f + 1e-12
        m = lam_f * row + (1 - lam_f) * p0
        if np.log(np.sum(p0**2 / m)) < 2 * beta - 1e-6:  # reverse side not binding: both must agree
            assert lam == pytest.approx(lam_f, abs=DEFAULT_TOL + 1e-9)
            checked += 1
    assert checked >= 3


def test_at_least_the_convexity_lower_bound():
    # Convexity: F(p̄_λ) ≤ 1 + λ(F(p)-1), so λ_c = expm1((α-1)αβ)/expm1((α-1)g(1)) is always feasible.
    p, p0 = _members(6, 10, 30, 0.1)
    alpha, beta = 3.0, 0.1
    proj = project(p, p0, alpha, beta)
    for lam, row in zip(proj.lambdas.tolist(), p):
        g1 = _direct_constraint(1.0, row, p0, alpha)
        lam_c = min(1.0, math.expm1((alpha - 1) * alpha * beta) / math.expm1((alpha - 1) * g1))
        assert lam >= lam_c - 1e-9


def test_vectorised_equals_row_by_row():
    p, p0 = _members(7, 5, 50, 0.2)
    together = project(p, p0, 3.0, 0.07).lambdas
    alone = torch.cat([project(row[None, :], p0, 3.0, 0.07).lambdas for row in p])
    assert torch.equal(together, alone)


def test_zero_budget_and_unsupported_mass_give_public():
    p, p0 = _members(8, 3, 8, 0.5)
    proj = project(p, p0, 3.0, 0.0)
    assert torch.equal(proj.lambdas, torch.zeros(3, dtype=torch.float64))
    p0_t = torch.as_tensor(p0, dtype=torch.float64)
    assert torch.equal(proj.mixed, (p0_t / p0_t.sum()).expand(3, -1))
    p0_hole = np.array([0.5, 0.5, 0.0])  # member puts mass where p0 has none: D = inf for every λ > 0
    assert project([[0.2, 0.2, 0.6]], p0_hole, 3.0, 1.0).lambdas.item() == 0.0
