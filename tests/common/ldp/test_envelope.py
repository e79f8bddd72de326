"""SanText by proposals draws the row law exactly: same integer weights, exact acceptance arithmetic.

The row route's law is K / N of the integer rows (``test_exact_law``); the proposal route must give
the same integers for every (input, output) pair, bound them from above, and accept exactly K_y of
the |C_j| U_j residues that name output y.
"""

import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist
from scipy.stats import chisquare

from privtune.common.ldp import EmbeddingSpace, SanText, load_embedding, make_generator
from privtune.common.ldp.envelope import PROPOSAL_COST, Cover, proposal_of
from privtune.common.ldp.sampling import implemented_law

SMOLLM2_DIAMETER_PAIR = (216, 3427)


class IdTokenizer:
    pad_token_id = bos_token_id = eos_token_id = 0

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def encode(self, text):
        raise NotImplementedError

    def decode(self, ids):
        raise NotImplementedError


def random_space(rows: int, dim: int, seed: int, spread: float = 1.0) -> tuple[EmbeddingSpace, np.ndarray]:
    rng = np.random.default_rng(seed)
    matrix = rng.normal(size=(rows, dim)) * np.exp(rng.normal(size=(1, dim)) * spread)
    return EmbeddingSpace.from_matrix(torch.tensor(matrix), IdTokenizer(rows), name=f"random-{seed}"), matrix


def row_weights(santext: SanText, tokens: torch.Tensor) -> torch.Tensor:
    cumsum = santext._rows(tokens)[0]
    return torch.diff(cumsum, dim=1, prepend=torch.zeros_like(cumsum[:, :1]))


def assert_routes_agree(santext: SanText, tokens: torch.Tensor) -> None:
    """Pair weights equal the batched and the one-token rows, bit for bit; the envelope bounds each of them."""
    space, sampler = santext.space, santext.proposals
    batched = row_weights(santext, tokens)
    everyone = torch.arange(space.size)
    envelope = sampler.envelope(tokens)
    cluster_of = torch.empty(space.size, dtype=torch.long)
    cluster_of[sampler.cover.members] = torch.repeat_interleave(
        torch.arange(len(sampler.cover.sizes)), sampler.cover.sizes
    )
    for i, token in enumerate(tokens.tolist()):
        pairs = sampler.proposal_weights(torch.full((space.size,), token), everyone)
        assert torch.equal(pairs, batched[i]), f"token {token}: {int((pairs != batched[i]).sum())} weights differ"
        assert torch.equal(row_weights(santext, torch.tensor([token]))[0], batched[i])
        assert bool((envelope.bounds[i, cluster_of] >= pairs).all()), f"token {token}: the envelope is below a weight"


@pytest.mark.slow
@pytest.mark.parametrize("epsilon", [1.0, 8.0, 20.0])
def test_smollm2_proposal_weights_are_the_row_weights(epsilon):
    space = load_embedding("smollm2")
    sample = torch.randperm(space.size, generator=torch.Generator().manual_seed(13))[:6]
    assert_routes_agree(SanText(space, epsilon), torch.cat([torch.tensor(SMOLLM2_DIAMETER_PAIR), sample]))


@pytest.mark.parametrize("epsilon", [0.5, 8.0, 200.0])
def test_routes_agree_on_random_spaces_of_varied_spread(epsilon):
    for seed, spread in enumerate((0.0, 1.0, 3.0)):
        space, _ = random_space(300, 24, seed, spread)
        assert_routes_agree(SanText(space, epsilon), torch.arange(0, 300, 17))


def test_grid_distances_are_exact_in_any_order_and_within_the_bound_of_the_given_embedding():
    space, matrix = random_space(400, 64, 5, spread=2.0)
    rows = torch.arange(0, 400, 7)
    batched = space.distances(rows)
    singles = torch.cat([space.distances(rows[i : i + 1]) for i in range(len(rows))])
    pairs = space.pair_distances(rows.repeat_interleave(400), torch.arange(400).repeat(len(rows))).view(len(rows), -1)
    assert torch.equal(batched, singles) and torch.equal(batched, pairs)
    given = cdist(matrix[rows.numpy()], matrix)
    assert float(np.abs(batched.numpy() - given).max()) <= space.rounding_bound


@pytest.mark.parametrize("dim", [1, 2, 7, 600])
def test_grid_integers_hold_the_points_exactly_and_pairs_match_rows_at_every_grid_width(dim):
    """Narrow embeddings get the widest grid (25-bit coordinates): int32 must still hold them exactly."""
    space, _ = random_space(120, dim, 7, spread=2.0)
    units, sq_units = space.grid_integers
    assert torch.equal(torch.from_numpy(units).double() * space.grid_unit, space.points)
    assert int(np.abs(units).max()) >= 2 ** int((51 - math.log2(dim)) // 2 - 1)
    assert torch.equal(torch.from_numpy(sq_units) * space.grid_unit**2, space.sq_norms)
    rows = torch.arange(120).repeat_interleave(120)
    pairs = space.pair_distances(rows, torch.arange(120).repeat(120)).view(120, 120)
    assert torch.equal(pairs, space.distances(torch.arange(120)))


def test_exactly_k_of_the_residues_naming_an_output_accept_it():
    """Enumerate every offset of every cluster: output y is accepted for exactly K_y offsets."""
    weights = torch.tensor([5, 0, 3, 7, 1, 2, 6])
    members = torch.tensor([3, 0, 6, 1, 2, 4, 5])  # clusters {3, 0, 6} and {1, 2, 4, 5}
    sizes, starts = torch.tensor([3, 4]), torch.tensor([0, 3])
    bounds = torch.tensor([7, 4])
    accepted = torch.zeros(len(weights), dtype=torch.long)
    for cluster in range(2):
        offsets = torch.arange(int(sizes[cluster] * bounds[cluster]))
        clusters = torch.full_like(offsets, cluster)
        token, residue = proposal_of(members, starts, clusters, offsets, bounds[clusters])
        accepted += torch.bincount(token[residue < weights[token]], minlength=len(weights))
    assert torch.equal(accepted, weights)


def test_proposal_draws_follow_the_row_law():
    space, _ = random_space(40, 6, 11)
    santext = SanText(space, 3.0)
    tokens = torch.tensor([0, 9, 33])
    law = implemented_law(santext._rows(tokens)[0])
    envelope = santext.proposals.envelope(tokens)
    draws = 60_000
    out = santext.proposals.draw(envelope, torch.arange(3).repeat_interleave(draws), make_generator(3))
    for row in range(3):
        counts = np.bincount(out[row * draws : (row + 1) * draws].numpy(), minlength=space.size)
        assert chisquare(counts, law[row].numpy() * draws).pvalue > 1e-4


def test_sample_takes_both_routes_and_each_position_draws_from_its_own_token():
    space, _ = random_space(200, 8, 2)
    santext = SanText(space, 400.0)  # so sharp that each token maps to itself
    ids = torch.cat([torch.arange(200), torch.full((5000,), 7)])  # 199 rare tokens, one frequent
    costs = (
        santext.proposals.envelope(torch.tensor([3, 7])).expected_proposals * PROPOSAL_COST * torch.tensor([1, 5001])
    )
    assert float(costs[0]) < space.size < float(costs[1])
    assert torch.equal(santext.sample(ids, make_generator(1)), ids)


def test_cover_clusters_every_token_once_within_its_radius():
    space, _ = random_space(500, 12, 4)
    cover = Cover.build(space, memory_cap_bytes=1 << 14, n_centres=37)
    assert torch.equal(cover.members.sort().values, torch.arange(500))
    assert int(cover.sizes.min()) >= 1 and int(cover.sizes.sum()) == 500
    for j in range(len(cover.centres)):
        members = cover.members[cover.starts[j] : cover.starts[j] + cover.sizes[j]]
        reach = space.distances(cover.centres[j : j + 1], members)[0]
        assert float(reach.max()) == float(cover.radii[j]) and not math.isnan(float(reach.max()))
