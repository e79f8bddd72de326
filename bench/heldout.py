"""The owners' held-out Shakespeare and how the quality benchmarks score models and PMixED on it.

Shared by ``bench.pmixed`` (quality part) and ``bench.utility`` so that both score the same text in
the same way: owners hold disjoint works (``private_partitions``), the last 10% of every work is
held out, and a fixed random choice (seed 0) of its packed blocks is scored.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping

import numpy as np
import torch

from privtune.common.corpus import private_partitions
from privtune.common.packing import Split, holdout_split, pack
from privtune.common.pmixed import DEFAULT_TOL, PMixedBudget, poisson_subsample, release_distribution
from privtune.common.text_tokenizer import TextTokenizer

HELDOUT_FRACTION = 0.1


def owner_splits(owners: int) -> list[Split]:
    """Each owner's works, cut into training text and the held-out last 10% of every work."""
    return [holdout_split(docs, HELDOUT_FRACTION) for docs in private_partitions(owners)]


def heldout_blocks(splits: list[Split], tokenizer: TextTokenizer, block: int, n_blocks: int) -> torch.Tensor:
    """``n_blocks`` packed blocks of all owners' held-out text, chosen at random with seed 0."""
    heldout = pack([d for s in splits for d in s.heldout], tokenizer, block)
    return heldout[torch.randperm(len(heldout), generator=torch.Generator().manual_seed(0))[:n_blocks]]


def mixture_nll(
    probs: torch.Tensor,
    targets: torch.Tensor,
    budgets: Mapping[Hashable, PMixedBudget],
    rngs: Mapping[Hashable, np.random.Generator],
    tol: float = DEFAULT_TOL,
) -> dict[Hashable, float]:
    """Summed -log mixture(true token) over positions, per budget: the evaluator's view of PMixED.

    ``probs`` is (1 + N, L, V): p0 then every member at each of L positions; ``targets`` (L,). At each
    position a fresh Poisson S is drawn (the budget's q and N) and the mixture of the members of S,
    under the budget's projection (p0 alone when S is empty), is scored; nothing is sampled or
    released. ``tol`` is the Rényi ball projection's bisection bracket: any tolerance keeps the
    guarantee (the feasible end is used), a coarser one only leaves each lambda up to ``tol`` below
    the largest feasible.
    """
    nll = dict.fromkeys(budgets, 0.0)
    for t in range(len(targets)):
        for key, budget in budgets.items():
            chosen = poisson_subsample(budget.n_members, budget.q, rngs[key])
            members = probs[1 + chosen, t] if chosen.size else None
            dist = release_distribution(members, probs[0, t], budget, tol)
            nll[key] -= math.log(float(dist[targets[t]]))
    return nll
