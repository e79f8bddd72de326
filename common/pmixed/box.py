r"""Projection of each member's next-token distribution into the box around the public one.

The box of log-widths (a, b) around p0 is B = { p : e^-a p0(t) <= p(t) <= e^b p0(t) for every t }.
Member i's projection is the point of B closest to p_i in the member's own log loss:

    p̄_i = argmin_{p in B} KL(p_i || p),   p̄_i(t) = clip(c_i p_i(t), e^-a p0(t), e^b p0(t)),

the form the KKT conditions of that convex problem give (Lagrange multiplier 1/c_i for Σ p = 1).
g(c) = Σ_t clip(c p_i(t), ...) is continuous, non-decreasing and piecewise linear in c, from
e^-a < 1 to e^b > 1, so a root exists; a safeguarded Newton iteration finds it (compiled, one pass
over the vocabulary per step, a few steps per row). A 1e-12 share of p0 is mixed into p_i first so
that every token of p0's support has p_i(t) > 0 and g does reach e^b (any function of p_i alone
that lands in B serves the privacy argument; this one only settles exact zeros).

Floating point (the guarantee is for the law the service really samples)
------------------------------------------------------------------------
``sample_token`` draws from a float64 vector v exactly with law v / Σv. Let u = 2^-53, V the
vocabulary, N the members, and σ = 1.01 (V + 1) u the bound on |Σ x - 1| for a float64 row x that
was divided by its own float64 sum (any summation order; all terms are >= 0). With V <= 2^24 and
N <= 2^20 (refused above), every rounding effect below is at most 4e-9 < ``ROUNDING`` = 1e-8:

1. The projection aims at the box shrunk by TARGET_MARGIN = 1e-6 on each side and solves g(c) = 1
   to within 1e-9 before renormalising; ``verify`` then checks every computed ratio row / p0
   against the box shrunk by ROUNDING.
   The exact ratio of the normalised laws, (row / Σrow) / (p0 / Σp0), differs from the computed
   one by a factor within 1 ± (2σ + u) < e^(±ROUNDING), so a row that passes lies in B(a, b)
   around the exact public law as a law, not just as a float vector. A row that fails raises.
2. The release for a realised S is v = Σ_{j in S} fl(1/|S|) p̄_j (one dot product of non-negative
   terms; members outside S contribute exact zeros) or p0 itself when S is empty. Its law differs
   from the exact average of the exact laws p̄_j / Σp̄_j by a factor within e^(±γ),
   γ <= 2(σ + 1.01 (N + 1) u) < ROUNDING.
3. The accountant (``box_bound``) therefore bounds the ratio of the neighbouring released laws by
   (1 + κ(e^(a+b) - 1)) · e^(2·ROUNDING), not by the exact-arithmetic value.

The projection is row-wise: row j's output is a function of p_j, p0 and (a, b) alone, so replacing
one member leaves every other member's projected row bit-for-bit unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np
import torch

from privtune.common.errors import PrivtuneError
from privtune.common.pmixed.divergence import Probs, as_distribution

ROUNDING = 1e-8
"""Log-ratio allowance for float64 rounding (module docstring); the accountant charges for it."""

MAX_VOCAB = 2**24
MAX_MEMBERS = 2**20
"""Beyond these sizes the rounding bounds of the module docstring exceed ROUNDING: refused."""

TARGET_MARGIN = 1e-6
"""The projection aims at the box shrunk by this much on each side: room for the normalisation and the check."""

SOLVE_TOL = 1e-9
"""How close to 1 the projected row's sum must be before it is renormalised (moves ratios by < 1e-9)."""

MAX_STEPS = 200

SUPPORT_SHARE = 1e-12
"""Share of p0 mixed into each member before projecting, so that the projection always exists."""


@dataclass(frozen=True)
class Box:
    """Log-widths of the box around p0: ``lower`` = a below, ``upper`` = b above."""

    lower: float
    upper: float

    def __post_init__(self) -> None:
        for name, value in (("lower", self.lower), ("upper", self.upper)):
            if not (math.isfinite(value) and 2 * TARGET_MARGIN <= value <= 50.0):
                raise PrivtuneError(
                    f"the box's {name} log-width must be in [{2 * TARGET_MARGIN:g}, 50], got {value}; a side narrower "
                    "than the float64 rounding allowance leaves no room to project into (raise epsilon or the "
                    "number of members, or move the split away from 0 or 1)"
                )

    @property
    def width(self) -> float:
        """a + b: the accountant's bound depends on the box through this alone."""
        return self.lower + self.upper

    def verify(self, rows: torch.Tensor, public: torch.Tensor) -> None:
        """Refuse any float64 row whose law is not inside the box around ``public``'s law (docstring, step 1)."""
        lo, hi = math.exp(-self.lower + ROUNDING), math.exp(self.upper - ROUNDING)
        if not _inside(rows.contiguous().numpy(), public.contiguous().numpy(), lo, hi):
            raise PrivtuneError(
                f"a projected member distribution left the box (log-widths {self.lower:.6g}, {self.upper:.6g}) "
                "around p0; no token was released. The inputs are probably not finite probabilities"
            )


@numba.njit(cache=True, nogil=True)
def _inside(rows: np.ndarray, public: np.ndarray, lo: float, hi: float) -> bool:
    """Every computed ratio rows / public in [lo, hi], and rows exactly 0 where public is (NaN fails)."""
    for row in range(rows.shape[0]):
        for t in range(rows.shape[1]):
            if public[t] > 0:
                ratio = rows[row, t] / public[t]
                if not (lo <= ratio <= hi):
                    return False
            elif rows[row, t] != 0:
                return False
    return True


def _check_sizes(k: int, vocab: int) -> None:
    if vocab > MAX_VOCAB or k > MAX_MEMBERS:
        raise PrivtuneError(
            f"the box projection's float64 rounding bound holds up to {MAX_VOCAB} tokens and {MAX_MEMBERS} "
            f"members, got {vocab} and {k}"
        )


@numba.njit(cache=True, nogil=True)
def _project_kernel(
    probs: np.ndarray, public: np.ndarray, low: np.ndarray, high: np.ndarray, tol: float, max_steps: int
) -> np.ndarray:
    """Each row clip(c p, low, high) / its sum, with c solving Σ_t clip(c p(t), low(t), high(t)) = 1 within ``tol``.

    g(c) = Σ clip(c p, low, high) is non-decreasing and piecewise linear, with slope Σ p over the
    tokens not clipped: a safeguarded Newton iteration keeps a bracket [lo, hi] with g(lo) < 1 <= g(hi)
    and takes the Newton step when it stays inside, else the bracket's geometric midpoint. Rows
    that do not converge come back as NaN, which the box check refuses.
    """
    k, vocab = probs.shape
    out = np.empty_like(probs)
    p = np.empty(vocab)
    tiny = np.finfo(np.float64).tiny
    for row in range(k):
        for t in range(vocab):
            p[t] = (1.0 - SUPPORT_SHARE) * probs[row, t] + SUPPORT_SHARE * public[t]
        lo, hi = np.inf, 0.0
        for t in range(vocab):
            if public[t] > 0:  # tokens outside p0's support stay 0 whatever c is
                safe = max(p[t], tiny)
                lo = min(lo, low[t] / safe)  # every token clipped low there: g = Σ low < 1
                hi = max(hi, high[t] / safe)  # every token clipped high there: g = Σ high > 1
        c = min(max(1.0, lo), hi)
        converged = False
        for _ in range(max_steps):
            g, slope = 0.0, 0.0
            for t in range(vocab):
                scaled = c * p[t]
                if scaled <= low[t]:
                    g += low[t]
                elif scaled >= high[t]:
                    g += high[t]
                else:
                    g += scaled
                    slope += p[t]
            if abs(g - 1.0) <= tol:
                converged = True
                break
            if g < 1.0:
                lo = c
            else:
                hi = c
            newton = c + (1.0 - g) / max(slope, tiny)
            c = newton if lo < newton < hi else np.sqrt(lo * hi)
        total = 0.0
        for t in range(vocab):
            out[row, t] = min(max(c * p[t], low[t]), high[t])
            total += out[row, t]
        for t in range(vocab):
            out[row, t] = out[row, t] / total if converged else np.nan
    return out


def project_box(member_probs: Probs, public_probs: Probs, box: Box) -> torch.Tensor:
    """Project each row of ``member_probs`` (k, V) into ``box`` around ``public_probs`` (V,); float64 (k, V).

    Both are renormalised in float64 first (``as_distribution``).
    """
    return project_rows(
        as_distribution(member_probs, "member_probs"), as_distribution(public_probs, "public_probs"), box
    )


def project_rows(members: torch.Tensor, public: torch.Tensor, box: Box) -> torch.Tensor:
    """``project_box`` for float64 rows already divided by their sums; the box is around exactly ``public``'s law.

    The release must use this same ``public`` vector for S = ∅ (the box is checked against its law).
    Every returned row is verified to lie in the box (``Box.verify``); nothing outside it is returned.
    """
    if members.ndim != 2 or public.ndim != 1 or members.shape[1] != public.shape[0]:
        raise ValueError(
            f"expected member_probs (k, V) and public_probs (V,), got {tuple(members.shape)} and {tuple(public.shape)}"
        )
    _check_sizes(members.shape[0], members.shape[1])
    low = math.exp(-box.lower + TARGET_MARGIN) * public
    high = math.exp(box.upper - TARGET_MARGIN) * public
    rows = torch.from_numpy(
        _project_kernel(
            members.contiguous().numpy(), public.contiguous().numpy(), low.numpy(), high.numpy(), SOLVE_TOL, MAX_STEPS
        )
    )
    box.verify(rows, public)
    return rows
