"""One PMixED query: subsample, project, average, sample one token (DESIGN.md §5, steps 1-3).

``next_token`` releases only the sampled token id plus the data-independent RDP it costs. It never
returns the mixture, S, |S| or the λ's: the accounting hides S (amplification by subsampling, and
the P(S = ∅) floor the bound rests on), so revealing even |S| would void the guarantee.
``mixture_distribution`` exposes the distribution for a given S, for tests and benchmarks only.
Counting queries against T and refusing after T is the service's ledger's job, not this module's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from privtune.common.pmixed.accountant import PMixedBudget
from privtune.common.pmixed.divergence import Probs, as_distribution
from privtune.common.pmixed.projection import DEFAULT_TOL, project
from privtune.common.pmixed.subsample import poisson_subsample, secure_rng

MemberProbs = Callable[[np.ndarray], Probs]
"""Given sorted member indices S (never empty), the (|S|, V) next-token distributions of those
members; called only for sampled members so the ensemble forward runs on S alone."""


@dataclass(frozen=True)
class TokenRelease:
    """What one query releases: the token, and the RDP at order ``alpha`` charged for it."""

    token: int
    rdp: float
    alpha: int


def mixture_distribution(
    member_probs: Probs | None, public_probs: Probs, alpha: float, beta: float, tol: float = DEFAULT_TOL
) -> torch.Tensor:
    """Average over S of the projected member distributions; p0 itself when S is empty (None or 0 rows)."""
    p0 = as_distribution(public_probs, "public_probs")
    if member_probs is None or len(member_probs) == 0:
        return p0
    return project(member_probs, p0, alpha, beta, tol).mixed.mean(dim=0)


def sample_token(probs: torch.Tensor, rng: np.random.Generator) -> int:
    """Inverse-CDF draw in float64; zero-probability tokens can never be returned."""
    cdf = torch.cumsum(probs.to(torch.float64), dim=0).numpy()
    return int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))


def next_token(
    public_probs: Probs,
    member_probs: MemberProbs,
    budget: PMixedBudget,
    rng: np.random.Generator | None = None,
    tol: float = DEFAULT_TOL,
) -> TokenRelease:
    """Answer one PMixED query with a token id; ``rng`` defaults to a fresh ``secure_rng()``."""
    rng = secure_rng() if rng is None else rng
    chosen = poisson_subsample(budget.n_members, budget.q, rng)
    members = None
    if chosen.size:
        members = torch.as_tensor(member_probs(chosen))
        if members.ndim != 2 or members.shape[0] != chosen.size:
            raise ValueError(f"member_probs returned shape {tuple(members.shape)} for {chosen.size} members")
    dist = mixture_distribution(members, public_probs, budget.alpha, budget.beta(), tol)
    return TokenRelease(token=sample_token(dist, rng), rdp=budget.rdp_per_query(), alpha=int(budget.alpha))
