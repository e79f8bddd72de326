"""The law each mechanism actually samples, computed exactly (not by sampling), against the printed guarantee.

``Mechanism.probabilities`` is K / N of the integer rows that ``sample`` searches (``test_sampling``
checks that exactly K_y residues of N map to output y), so these are the implemented laws.
"""

import numpy as np
import pytest
import torch

from privtune.common.ldp import CusText, SanText, load_embedding

EPSILONS = (1.0, 8.0, 20.0, 1000.0)
SMOLLM2_DIAMETER_PAIR = (216, 3427)


@pytest.fixture(scope="module")
def tiny():
    return load_embedding("tiny")


def worst_log_ratio(law_a: torch.Tensor, law_b: torch.Tensor) -> float:
    return float((law_a.log() - law_b.log()).abs().max())


def one_sided_outputs(law_a: torch.Tensor, law_b: torch.Tensor) -> int:
    return int(((law_a > 0) != (law_b > 0)).sum())


@pytest.mark.parametrize("epsilon", EPSILONS)
def test_santext_on_tiny_every_output_possible_and_every_pair_within_its_printed_bounds(tiny, epsilon):
    santext = SanText(tiny, epsilon)
    law = santext.probabilities(torch.arange(tiny.size))
    assert bool((law > 0).all()), "an output is impossible from some input"
    guarantee = santext.guarantee
    log_law = law.log()
    distances = tiny.distances(torch.arange(tiny.size))
    for x in range(tiny.size):
        ratios = (log_law[x][None, :] - log_law).abs().amax(dim=1)
        assert float(ratios.max()) <= guarantee.token_epsilon
        metric = epsilon * (distances[x] + tiny.rounding_bound) + guarantee.metric_slack
        assert bool((ratios <= metric).all()), f"metric bound violated from token {x}"


@pytest.mark.parametrize("epsilon", EPSILONS)
def test_custext_on_tiny_within_cell_ratios_within_the_printed_bound(tiny, epsilon):
    custext = CusText(tiny, epsilon, top_k=5)
    law = custext.probabilities(torch.arange(tiny.size))
    for cell in custext.members:
        cell = cell[cell >= 0]
        block = law[cell][:, cell]
        assert bool((block > 0).all()) and torch.allclose(block.sum(dim=1), torch.ones(len(cell), dtype=torch.float64))
        worst = max(worst_log_ratio(block[i], block[j]) for i in range(len(cell)) for j in range(len(cell)))
        assert worst <= custext.guarantee.token_epsilon
    assert custext.guarantee.scope == "within-cell"


@pytest.mark.slow
@pytest.mark.parametrize("epsilon", [1.0, 8.0, 20.0])
def test_santext_on_the_smollm2_diameter_pair(epsilon):
    """The pair farthest apart: no output possible from one and impossible from the other; ratios within print."""
    space = load_embedding("smollm2")
    santext = SanText(space, epsilon)
    pair = torch.tensor(SMOLLM2_DIAMETER_PAIR)
    assert float(space.distances(pair[:1], pair[1:])) >= santext.guarantee.diameter - 2 * space.rounding_bound
    law = santext.probabilities(pair)
    assert one_sided_outputs(law[0], law[1]) == 0 and bool((law > 0).all())
    assert worst_log_ratio(law[0], law[1]) <= santext.guarantee.token_epsilon
    assert np.isclose(float(law.sum(dim=1).min()), 1.0)
