r"""RDP accounting for PMixED: the per-query bound, the budget, and the β that meets it.

Privacy unit: one ensemble member's whole shard. Neighbouring deployments differ in one member's
next-token distribution (p_i replaced by any p_i', N fixed); the other N-1 members are arbitrary.

Per-query bound (derived here; valid for every realised S)
-----------------------------------------------------------
Let α ≥ 2 be an integer, ρ = α·β, q ∈ (0, 1) the Poisson rate, N the number of members, and

    κ  = (1 - (1-q)^N) / N          π0 = (1-q)^N = P(S = ∅)

    ε_q(α) = 1/(α-1) · ln( 1 + Σ_{ℓ=2..α} C(α,ℓ) · 2^ℓ · κ^ℓ · π0^(1-ℓ) · (e^((ℓ-1)ρ) - 1) ).

If every projected member p̄_j satisfies D_α(p̄_j||p0) ≤ ρ, one PMixED release satisfies
(α, ε_q(α))-RDP (both orderings of the neighbouring pair). Proof:

1. Split S = R ∪ ({i} if i ∈ S); R has the same law in both worlds. With m_S the average of p̄_j
   over S (m_∅ = p0), the released token has law M = E_S[m_S] = H + κ p̄_i, where
   H = (1-q) E[m_R] + q E[|R|/(|R|+1) m_R] does not involve member i and
   κ = q E[1/(1+|R|)] = (1-(1-q)^N)/N (binomial identity for |R| ~ Bin(N-1, q)). Likewise
   M' = H + κ p̄_i'. H contains the S = ∅ branch, so M' ≥ π0 p0 pointwise.
2. For integer α, Σ M^α M'^(1-α) = Σ M' (1 + κ(P-P')/M')^α
                                 = 1 + Σ_{ℓ≥2} C(α,ℓ) κ^ℓ Σ (P-P')^ℓ M'^(1-ℓ)
   (P = p̄_i, P' = p̄_i'; the ℓ = 1 term vanishes because both sum to 1).
3. M' ≥ π0 p0 gives |Σ (P-P')^ℓ M'^(1-ℓ)| ≤ π0^(1-ℓ) E_p0|X-Y|^ℓ with X = P/p0, Y = P'/p0.
4. Minkowski: E|X-Y|^ℓ ≤ ((E|X-1|^ℓ)^(1/ℓ) + (E|Y-1|^ℓ)^(1/ℓ))^ℓ, and |x-1|^ℓ ≤ x^ℓ - 1 - ℓ(x-1)
   for x ≥ 0, ℓ ≥ 2, so E|X-1|^ℓ ≤ E X^ℓ - 1 = e^((ℓ-1) D_ℓ(P||p0)) - 1 ≤ e^((ℓ-1)ρ) - 1, using
   D_ℓ ≤ D_α for ℓ ≤ α (monotonicity in the order; van Erven & Harremoës 2014, Thm 3).

Only the forward half D_α(p̄||p0) ≤ αβ of DESIGN.md's two-sided constraint is used; the reverse
half makes the projection more conservative and is kept as DESIGN.md states it.

Why not the PMixED paper's bound (Flemings, Razaviyayn, Annavaram 2024, arXiv:2403.15638)
---------------------------------------------------------------------------------------------
The paper's theorem text could not be retrieved here. The original code applies Zhu & Wang's
(ICML 2019) Poisson-subsampled RDP expansion to a per-|S| loss: αβ for |S| = 1 and
ln((n-1)/n + e^((α-1)·4αβ)/n)/(α-1) for |S| = n ≥ 2, evaluated at the realised |S|. That per-|S|
loss needs D_α(p̄_i||p̄_i') ≤ 4αβ for two members inside the ball, which order-α constraints
around p0 do not give: the pairwise divergence is unbounded (tests build such a pair). Without a
floor under M', no finite bound exists once another member can sit in S; the floor π0·p0 from the
S = ∅ branch is what makes the guarantee finite, so the bound depends on N (its leading term grows
like κ²/π0 ≈ e^(Nq)/N² once Nq is large) and is conservative rather than tight.

The box projection (``box``, ``box_bound``) is the other choice of ``PMixedBudget.projection``:
a max-divergence box whose lower side floors every mixture, so it needs no S = ∅ branch and
allows q = 1; its bound and proof are in ``box_bound``.

Conversion to (ε, δ)-DP: :mod:`privtune.common.privacy.rdp` (Balle et al. 2020, Thm 21), the one
conversion the ledger uses too. RDP composes additively over queries (Mironov 2017, Prop. 1), also
adaptively.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from scipy.optimize import brentq

from privtune.common.errors import PrivtuneError
from privtune.common.pmixed import box_bound
from privtune.common.pmixed.box import Box
from privtune.common.privacy.rdp import epsilon_to_rdp, rdp_to_epsilon

PROJECTIONS = ("box", "renyi")
"""``box``: members in a max-divergence box around p0 (``box_bound``); ``renyi``: the two-sided Rényi ball."""


def _check_order(alpha: float) -> int:
    if not (math.isfinite(alpha) and float(alpha).is_integer() and alpha >= 2):
        raise PrivtuneError(f"PMixED accounting needs an integer Rényi order alpha >= 2, got {alpha}; use e.g. 3")
    return int(alpha)


def _check_rate(q: float, n_members: int) -> None:
    if not 0.0 < q < 1.0:  # NaN fails too
        raise PrivtuneError(
            f"PMixED subsampling rate q must be in (0, 1), got {q}; q = 1 (no subsampling) has no finite "
            "RDP bound because nothing then forces the public distribution into the output"
        )
    if not (math.isfinite(n_members) and int(n_members) == n_members >= 1):
        raise PrivtuneError(f"PMixED needs n_members >= 1 ensemble members, got {n_members}")


def _log_expm1(x: float) -> float:
    """ln(e^x - 1) for x > 0 without overflow (e^x overflows float64 past x ≈ 709)."""
    return x + math.log1p(-math.exp(-x)) if x > 1.0 else math.log(math.expm1(x))


def per_query_rdp(alpha: int, beta: float, q: float, n_members: int) -> float:
    """ε_q(α) of one PMixED release (module docstring), evaluated in log space in float64."""
    alpha = _check_order(alpha)
    _check_rate(q, n_members)
    if not (math.isfinite(beta) and beta >= 0):
        raise PrivtuneError(f"beta must be a finite number >= 0, got {beta}")
    if beta == 0:
        return 0.0
    log_pi0 = n_members * math.log1p(-q)
    log_kappa = math.log(-math.expm1(log_pi0)) - math.log(n_members)
    rho = alpha * beta
    log_terms = [
        math.log(math.comb(alpha, ell))
        + ell * (math.log(2.0) + log_kappa)
        - (ell - 1) * log_pi0
        + _log_expm1((ell - 1) * rho)
        for ell in range(2, alpha + 1)
    ]
    top = max(log_terms)
    log_sum = top + math.log(math.fsum(math.exp(t - top) for t in log_terms))
    log_f = log_sum + math.log1p(math.exp(-log_sum)) if log_sum > 0 else math.log1p(math.exp(log_sum))
    return log_f / (alpha - 1)


@functools.lru_cache(maxsize=256)
def solve_beta(rdp_per_query: float, alpha: int, q: float, n_members: int) -> float:
    """Largest float64 β with per_query_rdp(α, β, q, N) ≤ rdp_per_query (brentq, then stepped down).

    The bound does not look at the realised S, so one β serves every query of a deployment.
    """
    if not (math.isfinite(rdp_per_query) and rdp_per_query > 0):
        raise PrivtuneError(f"per-query RDP budget must be a finite number > 0, got {rdp_per_query}")

    def excess(beta: float) -> float:
        return per_query_rdp(alpha, beta, q, n_members) - rdp_per_query

    hi = 1.0
    while excess(hi) <= 0:
        hi *= 2.0
    beta = brentq(excess, 0.0, hi, xtol=1e-300, rtol=8.9e-16, maxiter=500)
    while excess(beta) > 0:
        beta = math.nextafter(beta, 0.0)
    return beta


def epsilon_spent(queries: int, alpha: int, beta: float, q: float, delta: float, n_members: int) -> float:
    """ε of (ε, δ)-DP after ``queries`` PMixED releases at β (RDP composition + Balle et al. 2020)."""
    if queries < 0:
        raise PrivtuneError(f"queries must be >= 0, got {queries}")
    return rdp_to_epsilon(queries * per_query_rdp(alpha, beta, q, n_members), delta, alpha)


@dataclass(frozen=True)
class PMixedBudget:
    """A PMixED service budget: (ε, δ)-DP over T queries at Rényi order α, rate q, N members.

    ``n_members`` is needed because both bounds depend on N (through P(S = ∅) = (1-q)^N for the
    Rényi ball, through the mixing weight κ for the box). ``projection`` picks the constraint put
    on each member (``PROJECTIONS``); for the box, ``split`` is the share of its width above p0,
    b / (a + b), a data-independent choice the bound does not depend on.
    """

    epsilon: float
    delta: float
    alpha: float
    T: int
    q: float
    n_members: int
    projection: str = "renyi"
    split: float = 0.5

    def __post_init__(self) -> None:
        if self.projection not in PROJECTIONS:
            raise PrivtuneError(
                f"unknown PMixED projection {self.projection!r}; choose one of {', '.join(PROJECTIONS)}"
            )
        if self.projection == "renyi":
            _check_order(self.alpha)
            _check_rate(self.q, self.n_members)
        else:
            box_bound.check_order(self.alpha)
            box_bound.mixing_weight(self.q, self.n_members)
            if not 0.0 < self.split < 1.0:
                raise PrivtuneError(
                    f"the box split (share of its width above p0) must be in (0, 1), got {self.split}: a box with "
                    "one side of width 0 holds p0 alone"
                )
        if not (math.isfinite(self.epsilon) and self.epsilon > 0):
            raise PrivtuneError(f"PMixED epsilon must be a finite number > 0, got {self.epsilon}")
        if not 0 < self.delta < 1:
            raise PrivtuneError(f"PMixED delta must be in (0, 1), got {self.delta}")
        if not (math.isfinite(self.T) and int(self.T) == self.T >= 1):
            raise PrivtuneError(f"PMixED query budget T must be a positive integer, got {self.T}")
        if not self.rdp_total() > 0:
            raise PrivtuneError(
                f"epsilon={self.epsilon} is too small for delta={self.delta} at alpha={self.alpha}: the RDP budget "
                f"{self.rdp_total():.4g} is not positive; raise epsilon or delta, or change alpha"
            )
        if self.projection == "box":
            self.box()  # refuses, here rather than at the first query, a box with a side too narrow to project into

    def rdp_total(self) -> float:
        """RDP at order α available to the whole service."""
        return epsilon_to_rdp(self.epsilon, self.delta, self.alpha)

    def rdp_per_query(self) -> float:
        """RDP at order α each query may spend: rdp_total / T."""
        return self.rdp_total() / self.T

    def _require(self, projection: str) -> None:
        if self.projection != projection:
            raise PrivtuneError(f"this budget is for the {self.projection} projection, not the {projection} one")

    def beta(self) -> float:
        """β whose per-query RDP bound equals rdp_per_query() (never exceeds it); Rényi ball only."""
        self._require("renyi")
        return solve_beta(self.rdp_per_query(), int(self.alpha), self.q, self.n_members)

    def width(self) -> float:
        """The box's width a + b whose per-query RDP bound is at most rdp_per_query(); box only."""
        self._require("box")
        return box_bound.solve_width(self.rdp_per_query(), float(self.alpha), self.q, self.n_members)

    def box(self) -> Box:
        """The box the members are projected into: width() split into b = split · width above p0, a below."""
        width = self.width()
        return Box(lower=(1.0 - self.split) * width, upper=self.split * width)

    def rdp_spent_per_query(self) -> float:
        """The per-query bound at the solved β or width: what one release really costs (<= rdp_per_query())."""
        if self.projection == "box":
            return box_bound.per_query_rdp(self.alpha, self.width(), self.q, self.n_members)
        return per_query_rdp(int(self.alpha), self.beta(), self.q, self.n_members)

    def parameters(self) -> dict[str, float | str]:
        """The projection and its solved constraint, for status and results (all data-independent)."""
        if self.projection == "box":
            box = self.box()
            return {"projection": "box", "split": self.split, "lower": box.lower, "upper": box.upper}
        return {"projection": "renyi", "beta": self.beta()}

    def epsilon_after(self, queries: int) -> float:
        """ε of (ε, δ)-DP after ``queries`` releases at beta() or width(); at most epsilon at T."""
        if queries < 0:
            raise PrivtuneError(f"queries must be >= 0, got {queries}")
        return rdp_to_epsilon(queries * self.rdp_spent_per_query(), self.delta, self.alpha)


ORDERS = (2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 32, 64)
"""The Rényi orders ``best_budget`` chooses among: integers, as the ball's bound and the service's status need."""


def room(budget: PMixedBudget) -> float:
    """How far the budget lets a member move from p0: the box's width, or the Rényi ball's radius α·β."""
    return budget.width() if budget.projection == "box" else budget.alpha * budget.beta()


def best_budget(
    epsilon: float,
    delta: float,
    T: int,
    q: float,
    n_members: int,
    projection: str = "box",
    split: float = 0.5,
    orders: tuple[float, ...] = ORDERS,
) -> PMixedBudget:
    """The budget at the order of ``orders`` that gives the members the most ``room``.

    The choice looks at the accountant only, never at data, so it costs no privacy. Orders at which
    epsilon cannot be met (no positive RDP budget) are skipped; none left is refused, and so is any
    other invalid setting.
    """
    candidates = [
        PMixedBudget(epsilon, delta, alpha, T, q, n_members, projection, split)
        for alpha in orders
        if epsilon_to_rdp(epsilon, delta, alpha) > 0
    ]
    if not candidates:
        raise PrivtuneError(
            f"no Rényi order of {orders} meets epsilon={epsilon} at delta={delta} over {T} queries; raise epsilon"
        )
    return max(candidates, key=room)
