"""One PMixED query: subsample, project, average, sample one token (the one path the service uses).

``next_token`` releases only the sampled token id plus the data-independent RDP it costs. It never
returns the mixture, S, |S| or the λ's: the accounting hides S (amplification by subsampling, and
the P(S = ∅) floor the bound rests on), so revealing even |S| would void the guarantee. That
includes timing: the caller passes the distributions of ALL N members, every member is projected,
and the average over S is one fixed-size product with S's indicator, so the work per query does
not depend on S (see ``EnsembleSession.private_next_token``).

The projection is the budget's: the Rényi ball (``projection``) or the box (``box``). The mean
over S is computed in float64 (relative error at most (N + 1) u per entry, u = 2^-53), which moves
a Rényi divergence by orders of magnitude less than the margin the ball's projection keeps
(``projection.FEASIBILITY_SLACK``); the box's bound charges for it (``box``'s docstring). The
token is then drawn from exactly that float64 vector (``sample_token``): no output of positive
probability is ever impossible, and none is rounded.
Counting queries against T and refusing after T is the service's ledger's job, not this module's.
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass

import numpy as np
import torch

from privtune.common.pmixed.accountant import PMixedBudget
from privtune.common.pmixed.box import project_rows
from privtune.common.pmixed.divergence import Probs, as_distribution
from privtune.common.pmixed.projection import DEFAULT_TOL, project
from privtune.common.pmixed.subsample import poisson_subsample, secure_rng

MANTISSA_BITS = 53
HALF_BITS = 26  # bucket sums of 53-bit mantissas are taken in two halves so that int64 never overflows


@dataclass(frozen=True)
class TokenRelease:
    """What one query releases: the token, and the RDP at order ``alpha`` charged for it."""

    token: int
    rdp: float
    alpha: float


@dataclass(frozen=True)
class Buckets:
    """A float64 weight vector as exact integers: outputs grouped by binary exponent.

    Output ``support[i]`` has weight ``mantissas[i] * 2^(exponent of its bucket - 53)`` exactly, with
    ``mantissas`` in [2^52, 2^53); ``totals[b]`` is bucket b's exact weight in units of the smallest
    bucket's 2^(e - 53), a Python int.
    """

    support: np.ndarray
    mantissas: np.ndarray
    starts: np.ndarray
    totals: list[int]


def mixture_distribution(
    member_probs: Probs | None, public_probs: Probs, alpha: float, beta: float, tol: float = DEFAULT_TOL
) -> torch.Tensor:
    """Average over S of the projected member distributions; p0 itself when S is empty (None or 0 rows)."""
    p0 = as_distribution(public_probs, "public_probs")
    if member_probs is None or len(member_probs) == 0:
        return p0
    return project(member_probs, p0, alpha, beta, tol).mixed.mean(dim=0)


def project_members(members: torch.Tensor, public: torch.Tensor, budget: PMixedBudget, tol: float) -> torch.Tensor:
    """Each row of ``members`` (renormalised float64) under the budget's projection, around exactly ``public``."""
    if budget.projection == "box":
        return project_rows(members, public, budget.box())
    return project(members, public, budget.alpha, budget.beta(), tol).mixed


def release_distribution(
    member_probs: Probs | None, public_probs: Probs, budget: PMixedBudget, tol: float = DEFAULT_TOL
) -> torch.Tensor:
    """``mixture_distribution`` under the budget's projection: the members of S projected and averaged."""
    p0 = as_distribution(public_probs, "public_probs")
    if member_probs is None or len(member_probs) == 0:
        return p0
    return project_members(as_distribution(member_probs, "member_probs"), p0, budget, tol).mean(dim=0)


def buckets(probs: Probs) -> Buckets:
    """The exact integer form of the non-negative float64 vector ``probs`` (zeros left out)."""
    p = torch.as_tensor(probs, dtype=torch.float64).numpy()
    support = np.flatnonzero(p > 0)
    fractions, exponents = np.frexp(p[support])  # p = f * 2^e, f in [0.5, 1): f * 2^53 is an exact integer
    order = np.argsort(exponents, kind="stable")
    support, exponents = support[order], exponents[order]
    mantissas = (fractions[order] * 2.0**MANTISSA_BITS).astype(np.int64)
    starts = np.flatnonzero(np.r_[True, exponents[1:] != exponents[:-1]])
    high = np.add.reduceat(mantissas >> HALF_BITS, starts)
    low = np.add.reduceat(mantissas & ((1 << HALF_BITS) - 1), starts)
    smallest = int(exponents[0])
    totals = [
        ((int(h) << HALF_BITS) + int(lo)) << (int(e) - smallest)
        for h, lo, e in zip(high, low, exponents[starts], strict=True)
    ]
    return Buckets(support, mantissas, starts, totals)


def uniform_below(n: int, rng: np.random.Generator) -> int:
    """An integer uniform on [0, n) for any positive Python int n: uniform bits, rejection above n."""
    bits = n.bit_length()
    size = (bits + 7) // 8
    while True:
        value = int.from_bytes(rng.bytes(size), "little") >> (8 * size - bits)
        if value < n:
            return value


def sample_token(probs: Probs, rng: np.random.Generator) -> int:
    """A draw with probability exactly probs[y] / sum(probs), for every y, from the float64 values as given.

    A bucket (outputs of one binary exponent) is chosen with its exact integer weight; within it,
    a uniform member is accepted with probability mantissa / 2^53 (at least 1/2), which makes each
    member's chance proportional to its mantissa. Together: probs[y] / sum(probs), exactly (given
    uniform generator bits); zero-probability outputs are never drawn.
    """
    b = buckets(probs)
    cumulative = list(itertools.accumulate(b.totals))
    bucket = bisect.bisect_right(cumulative, uniform_below(cumulative[-1], rng))
    start = int(b.starts[bucket])
    stop = int(b.starts[bucket + 1]) if bucket + 1 < len(b.starts) else len(b.support)
    while True:
        member = start + int(rng.integers(stop - start))
        if int(rng.integers(1 << MANTISSA_BITS)) < int(b.mantissas[member]):
            return int(b.support[member])


def subset_distribution(projected: torch.Tensor, public: torch.Tensor, chosen: np.ndarray) -> torch.Tensor:
    """The float64 vector a query samples from: the mean of the ``chosen`` rows of ``projected``, or ``public``.

    One fixed-size product with S's indicator (members outside S contribute exact zeros), so neither the
    work nor the rounding of the members in S depends on which others were left out.
    """
    selector = torch.zeros(projected.shape[0], dtype=torch.float64)
    selector[torch.from_numpy(chosen)] = 1.0 / max(len(chosen), 1)
    empty = torch.tensor(float(len(chosen) == 0), dtype=torch.float64)
    return selector @ projected + empty * public


def next_token(
    public_probs: Probs,
    member_probs: Probs,
    budget: PMixedBudget,
    rng: np.random.Generator | None = None,
    tol: float = DEFAULT_TOL,
) -> TokenRelease:
    """Answer one PMixED query with a token id; ``member_probs`` are ALL N members' distributions (N, V).

    ``rng`` defaults to a fresh ``secure_rng()``.
    """
    rng = secure_rng() if rng is None else rng
    p0 = as_distribution(public_probs, "public_probs")
    members = as_distribution(member_probs, "member_probs")
    if members.shape != (budget.n_members, p0.shape[0]):
        raise ValueError(
            f"member_probs has shape {tuple(members.shape)}, expected ({budget.n_members}, {p0.shape[0]}): "
            "every member's distribution, every query"
        )
    chosen = poisson_subsample(budget.n_members, budget.q, rng)
    dist = subset_distribution(project_members(members, p0, budget, tol), p0, chosen)
    return TokenRelease(token=sample_token(dist, rng), rdp=budget.rdp_per_query(), alpha=budget.alpha)
