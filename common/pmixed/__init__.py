"""PMixED private next-token prediction: the mathematics (DESIGN.md §5).

Subsampling (``subsample``), Rényi divergence (``divergence``), projection onto the Rényi ball
around the public model (``projection``) or into the max-divergence box around it (``box``), RDP
accounting (``accountant``, the box's bound in ``box_bound``) and one query end to end
(``mechanism``). The ensemble forward and the Ray service live elsewhere and call ``next_token``.
"""

from privtune.common.pmixed.accountant import (
    PROJECTIONS,
    PMixedBudget,
    best_budget,
    epsilon_spent,
    per_query_rdp,
    solve_beta,
)
from privtune.common.pmixed.box import Box, project_box
from privtune.common.pmixed.divergence import renyi_divergence, symmetric_renyi_divergence
from privtune.common.pmixed.mechanism import (
    TokenRelease,
    mixture_distribution,
    next_token,
    release_distribution,
    sample_token,
)
from privtune.common.pmixed.projection import DEFAULT_TOL, Projection, project
from privtune.common.pmixed.subsample import poisson_subsample, secure_rng

__all__ = [
    "DEFAULT_TOL",
    "PROJECTIONS",
    "Box",
    "PMixedBudget",
    "Projection",
    "TokenRelease",
    "best_budget",
    "epsilon_spent",
    "mixture_distribution",
    "next_token",
    "per_query_rdp",
    "poisson_subsample",
    "project",
    "project_box",
    "release_distribution",
    "renyi_divergence",
    "sample_token",
    "secure_rng",
    "solve_beta",
    "symmetric_renyi_divergence",
]
