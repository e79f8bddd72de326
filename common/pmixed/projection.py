"""Projection of each sampled member's distribution onto the Rényi ball around the public one.

For member i, p̄_i = λ_i p_i + (1-λ_i) p0 with the largest λ_i in [0, 1] such that
max(D_α(p̄_i||p0), D_α(p0||p̄_i)) ≤ α·β (DESIGN.md §5, step 2).

Why bisection, and why it is correct:
- Both divergences are non-decreasing in λ. For λ' < λ, p̄_λ' = (λ'/λ) p̄_λ + (1-λ'/λ) p0, and
  F(P) = Σ P^α p0^(1-α) (resp. Σ p0^α P^(1-α)) is convex in P with F(p0) = 1, so
  F(p̄_λ') ≤ (λ'/λ) F(p̄_λ) + (1-λ'/λ) ≤ F(p̄_λ) whenever F(p̄_λ) ≥ 1, which always holds.
  The feasible set is therefore an interval [0, λ*]; tests check the monotonicity numerically.
- No closed form covers the constraint: for α = 2 the forward direction alone gives
  λ = sqrt(expm1(αβ) / χ²(p||p0)), but the reverse direction Σ p0² / p̄ is rational in λ with
  no closed-form root, and for other α neither direction has one. So we bisect (all members in
  parallel as one tensor) and use the α = 2 forward formula only as a test oracle.
- The bisection keeps its lower end feasible at every step and returns it, so the released λ
  always satisfies the constraint (the original could return the infeasible side). The check
  keeps FEASIBILITY_SLACK of margin, so float64 rounding in the sums cannot pass an infeasible λ.
  λ = 0 (p̄ = p0 exactly) is feasible by definition and is the start of every bracket.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from privtune.common.pmixed.divergence import Probs, as_distribution, renyi_divergence_from_logs

DEFAULT_TOL = 1e-7
"""Width of the final bracket [λ, λ+tol]: λ is feasible, λ+tol is not (unless λ = 1)."""

FEASIBILITY_SLACK = 1e-10
"""Absolute margin under α·β that a divergence must meet; far above float64 rounding in the sums."""


@dataclass(frozen=True)
class Projection:
    """Projected distributions (k, V) and the mixing weights λ (k,) that produced them."""

    mixed: torch.Tensor
    lambdas: torch.Tensor


def mix(member_probs: torch.Tensor, public_probs: torch.Tensor, lambdas: torch.Tensor) -> torch.Tensor:
    """λ p + (1-λ) p0, row-wise; the one formula both the feasibility check and the release use."""
    lam = lambdas.unsqueeze(-1)
    return lam * member_probs + (1.0 - lam) * public_probs


def _constraint(
    member_probs: torch.Tensor,
    public_probs: torch.Tensor,
    log_public: torch.Tensor,
    lambdas: torch.Tensor,
    alpha: float,
) -> torch.Tensor:
    log_mixed = torch.log(mix(member_probs, public_probs, lambdas))
    return torch.maximum(
        renyi_divergence_from_logs(log_mixed, log_public, alpha),
        renyi_divergence_from_logs(log_public, log_mixed, alpha),
    )


def project(
    member_probs: Probs, public_probs: Probs, alpha: float, beta: float, tol: float = DEFAULT_TOL
) -> Projection:
    """Project each row of ``member_probs`` (k, V) onto the α·β ball around ``public_probs`` (V,)."""
    p = as_distribution(member_probs, "member_probs")
    p0 = as_distribution(public_probs, "public_probs")
    if p.ndim != 2 or p0.ndim != 1 or p.shape[1] != p0.shape[0]:
        raise ValueError(
            f"expected member_probs (k, V) and public_probs (V,), got {tuple(p.shape)} and {tuple(p0.shape)}"
        )
    if beta < 0 or not 0 < tol < 1:
        raise ValueError(f"need beta >= 0 and 0 < tol < 1, got beta={beta}, tol={tol}")
    bound = alpha * beta - FEASIBILITY_SLACK
    log_p0 = torch.log(p0)
    k = p.shape[0]

    lo = torch.zeros(k, dtype=torch.float64)
    hi = torch.ones(k, dtype=torch.float64)
    whole = _constraint(p, p0, log_p0, hi, alpha) <= bound
    lo[whole] = 1.0
    active = torch.nonzero(~whole).flatten()
    if active.numel():
        p_act, lo_act, hi_act = p[active], lo[active], hi[active]
        for _ in range(math.ceil(math.log2(1.0 / tol))):
            mid = 0.5 * (lo_act + hi_act)
            ok = _constraint(p_act, p0, log_p0, mid, alpha) <= bound
            lo_act = torch.where(ok, mid, lo_act)
            hi_act = torch.where(ok, hi_act, mid)
        lo[active] = lo_act
    return Projection(mixed=mix(p, p0, lo), lambdas=lo)
