r"""RDP of one PMixED release when every member is projected into the box around p0 (``box``).

Privacy unit: one ensemble member's whole shard; neighbouring deployments differ in one member's
distribution p_i (replaced by any p_i', N fixed), the other N-1 members arbitrary.

Per-query bound (valid for every realised S, every q in (0, 1], every real order α > 1)
----------------------------------------------------------------------------------------
With κ = (1 - (1-q)^N) / N, w = a + b the box's width and U = (1 + κ(e^w - 1)) · e^(2·ROUNDING):

    ε_q(α) = 1/(α-1) · ln( (U^α + U^(1-α)) / (1 + U) ),        for both orderings of the pair.

Proof, in exact arithmetic first (U without the rounding factor):

1. As in ``accountant`` (step 1), M = E_S[m_S] = H + κ p̄_i and M' = H + κ p̄_i', where m_S is the
   average of the projected members of S (m_∅ = p0) and H = Σ_R P(R) (1 - q + q|R|/(|R|+1)) m_R
   does not involve member i. H has mass 1 - κ and H / (1 - κ) is a convex combination of points
   of B (each m_R is, and p0 is in B), so H >= (1 - κ) e^-a p0 pointwise.
2. Per token, with x = p̄_i/p0, y = p̄_i'/p0 in [e^-a, e^b] and h = H/p0 >= (1-κ) e^-a,
   r = M/M' = (h + κx)/(h + κy). The ratio is largest at x = e^b, y = e^-a and the smallest h,
   giving 1 + κ(e^w - 1) = U; smallest at x = e^-a, y = e^b, giving exactly 1/U. So r is in
   [1/U, U] at every token, for every realisation of the other members.
3. E_{M'}[r] = 1 (both are laws), and r ↦ r^α is convex for real α > 1, so Σ M' r^α is at most
   its value for the law on {1/U, U} with mean 1: weights U/(1+U) and 1/(1+U), which gives
   (U^α + U^(1-α))/(1+U). Swapping M and M' swaps nothing in steps 1-2: the same bound holds
   for D_α(M'||M).

This is the RDP of randomised response with pure ε0 = ln U, and one member's effect on U is the
pure-DP amplification ln(1 + κ(e^w - 1)) of a mixture weight κ: the bound is tight when N = 1,
q = 1 and e^b + e^-a = 2 (two tokens; tests check it), and no bound that uses only the ratio range
[1/U, U] can be smaller.

Floating point: the box, its check, and the release are analysed in ``box`` (module docstring);
what is really sampled has its neighbouring ratio within [1/U, U] with U as above, including the
e^(2·ROUNDING) factor, which the formula charges. Conversion to (ε, δ)-DP goes through
:mod:`privtune.common.privacy.rdp`, the one conversion; RDP composes over adaptive queries.

Unlike the Rényi ball (``accountant``), nothing here needs the S = ∅ branch: the floor under M'
is the box's own lower side, so q = 1 (the deterministic average of all N members, κ = 1/N) is
allowed, and a q below 1 buys almost nothing once qN is a few (κ barely moves).
"""

from __future__ import annotations

import functools
import math

from scipy.optimize import brentq

from privtune.common.errors import PrivtuneError
from privtune.common.pmixed.box import ROUNDING

MAX_WIDTH = 100.0
"""The widest box the solver considers (e^100 p0 is far past any probability)."""


def check_order(alpha: float) -> float:
    if not (math.isfinite(alpha) and alpha > 1):
        raise PrivtuneError(f"the box bound needs a Rényi order alpha > 1, got {alpha}")
    return float(alpha)


def mixing_weight(q: float, n_members: int) -> float:
    """κ = (1 - (1-q)^N) / N: member i's expected weight in the released mixture."""
    if not 0.0 < q <= 1.0:  # NaN fails too
        raise PrivtuneError(f"the box projection's subsampling rate q must be in (0, 1], got {q}")
    if not (math.isfinite(n_members) and int(n_members) == n_members >= 1):
        raise PrivtuneError(f"PMixED needs n_members >= 1 ensemble members, got {n_members}")
    return -math.expm1(n_members * math.log1p(-q)) / n_members if q < 1 else 1.0 / n_members


def _log_expm1(x: float) -> float:
    """ln(e^x - 1) for x > 0 without overflow."""
    return x + math.log1p(-math.exp(-x)) if x > 1.0 else math.log(math.expm1(x))


def log_ratio_bound(width: float, q: float, n_members: int) -> float:
    """ln U: the largest |ln(M/M')| at any token (module docstring), rounding allowance included."""
    if not (math.isfinite(width) and width >= 0):
        raise PrivtuneError(f"the box width must be a finite number >= 0, got {width}")
    kappa = mixing_weight(q, n_members)
    return math.log1p(kappa * math.expm1(width)) + 2 * ROUNDING


def per_query_rdp(alpha: float, width: float, q: float, n_members: int) -> float:
    """ε_q(α) of one release with every member in a box of ``width`` = a + b (module docstring).

    (U^α + U^(1-α))/(1+U) - 1 = expm1((α-1)x) · expm1(αx) · e^(-(α-1)x) / (1 + e^x) with x = ln U:
    a product of positive factors, evaluated in logs, so neither cancellation nor overflow occurs.
    """
    alpha = check_order(alpha)
    x = log_ratio_bound(width, q, n_members)
    log_excess = _log_expm1((alpha - 1) * x) + _log_expm1(alpha * x) - (alpha - 1) * x - (x + math.log1p(math.exp(-x)))
    log_f = log_excess + math.log1p(math.exp(-log_excess)) if log_excess > 0 else math.log1p(math.exp(log_excess))
    return log_f / (alpha - 1)


@functools.lru_cache(maxsize=256)
def solve_width(rdp_per_query: float, alpha: float, q: float, n_members: int) -> float:
    """Largest float64 width with per_query_rdp(α, width, q, N) <= rdp_per_query (brentq, then stepped down)."""
    if not (math.isfinite(rdp_per_query) and rdp_per_query > 0):
        raise PrivtuneError(f"per-query RDP budget must be a finite number > 0, got {rdp_per_query}")

    def excess(width: float) -> float:
        return per_query_rdp(alpha, width, q, n_members) - rdp_per_query

    if excess(0.0) > 0:
        raise PrivtuneError(
            f"a per-query RDP of {rdp_per_query:.3g} at order {alpha:g} is below what float64 rounding alone costs; "
            "raise epsilon or lower the number of queries T"
        )
    if excess(MAX_WIDTH) <= 0:
        return MAX_WIDTH
    width = brentq(excess, 0.0, MAX_WIDTH, xtol=1e-300, rtol=8.9e-16, maxiter=500)
    while excess(width) > 0:
        width = math.nextafter(width, 0.0)
    return width
