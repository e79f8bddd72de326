"""SanText draws without a full distance row: exact rejection sampling under a cluster envelope.

Why: a SanText row is one distance to every token of the vocabulary (49k for SmolLM2), and most
distinct tokens of a text occur only a few times, so computing a whole row for a handful of draws
dominates the time. A proposal costs one distance instead.

The law sampled is the row law exactly, K_y / N with K_y = floor(exp(-eps d(x, y) / 2) 2^m) + F
(:func:`santext_weights`), N = sum K. The vocabulary is covered by clusters around centre tokens;
r_j is the largest computed distance from centre c_j to a member. For input x every member y of
cluster j has d(x, y) >= d(x, c_j) - r_j, so U_j = K(max(0, d(x, c_j) - r_j - margin)) + 2^(m-50) + 1
>= K_y: the margin covers the distances' rounding, and the added units a computed exp that is not
monotone by up to 8 ulps (2^-50 relative, times 2^m, plus one for the floor). A proposal picks
cluster j with probability exactly |C_j| U_j / T (T = sum |C_j| U_j, ``sampling.sample_rows``),
then one integer uniform on [0, |C_j| U_j): member i = offset // U_j (uniform over the cluster)
and u = offset mod U_j (uniform on [0, U_j)), accepted when u < K_y. Each pair (y, accepted) has
probability exactly K_y / T, so an accepted draw is y with probability exactly K_y / N; rejected
proposals are redrawn independently.
No float step enters the law. A proposal with K_y > U_j would distort it, so it is refused as an
error, never sampled.

K_y of a proposal is computed from the same bits of distance as the row's (the embedding's grid
makes distances independent of how they are summed, ``EmbeddingSpace``) through the same
elementwise operations, so both routes give the same integers; ``tests/common/ldp/test_envelope``
compares them on SmolLM2 at epsilon 1, 8 and 20.

Which route a distinct token takes only changes the time, never the law: proposals when its count
times the expected number of proposals per draw (T / N, estimated from the centre distances) costs
less than a row.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields

import torch

from privtune.common.errors import PrivtuneError
from privtune.common.ldp.embedding import EmbeddingSpace
from privtune.common.ldp.geometry import cache_path, write_atomically
from privtune.common.ldp.sampling import cumulative, quantize, sample_rows, scale_bits, uniform_residues

CENTRES = 256
COVER_VERSION = 1
COVER_SEED = 0  # the centres are a fixed pseudo-random choice of token ids: public, independent of any text
PROPOSAL_COST = 16.0
"""Row entries that one proposal costs (a dot product of two gathered rows, with its share of the round's vector
operations, against an entry of a matrix product and its weight), measured on SmolLM2 on the 2-core machine."""
PROPOSAL_BATCH_BYTES = 32 << 20
PROPOSAL_BYTES = 32  # per proposal and batch: its distance, then weight, and its input and output ids
MAX_TRIES = 64  # proposals per pending draw and round, unless the round has room for more (ROUND_PROPOSALS)
ROUND_PROPOSALS = 1 << 20
STEADY_ROUNDS = 4  # rounds at ROUND_SHARE of the estimated proposals per draw before a pending draw doubles them
ROUND_SHARE = 0.5
"""Share of its expected proposals a pending draw makes per round. Proposals after a draw's first success are
wasted, so smaller rounds waste less (about 1.27 E proposals per draw at 0.5, 1.58 E at 1) for more rounds; 0.5 was
~7% faster than 1 on SmolLM2's whole-corpus rare tokens (3 alternating runs each)."""
EXP_SLACK_BITS = 50
MARGIN_ROUNDINGS = 4.0  # the triangle inequality on computed distances loses at most 3 roundings


def santext_weights(distances: torch.Tensor, epsilon: float, width: int) -> torch.Tensor:
    """SanText's integer weights floor(exp(-eps d / 2) 2^m) + F for rows of ``width`` outputs; consumes ``distances``.

    Elementwise on purpose: the same distance bits give the same integer, whichever route computed them.
    """
    return quantize(distances.mul_(-epsilon / 2.0).exp_(), width=width)


def exp_slack_units(width: int) -> int:
    """Units covering a computed exp off by up to 2^-50 relative (8 ulps), scaled by 2^m, plus the floor's one."""
    return (1 << max(0, scale_bits(width) - EXP_SLACK_BITS)) + 1


@contextmanager
def single_threaded() -> Iterator[None]:
    """Run torch's CPU operations on one thread, then restore the count.

    A proposal round is a compiled single-threaded loop of dot products (``kernels``) between
    vector operations of modest size: intra-op threads add mostly their synchronisation (322k draws
    on SmolLM2, about 1.6M proposals, took 5.6 s on one thread and 12.6-15 s on two, on the 2-core
    machine at load 8-9), while whole rows cost the same either way.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def proposal_of(
    members: torch.Tensor, starts: torch.Tensor, cluster: torch.Tensor, offset: torch.Tensor, bound: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split an offset uniform on [0, |C_j| U_j) into a member (uniform) and a residue uniform on [0, U_j)."""
    return members[starts[cluster] + offset // bound], offset % bound


@dataclass(frozen=True)
class Cover:
    """Clusters of the vocabulary: each token belongs to its nearest centre (ties to the first)."""

    centres: torch.Tensor  # (C,) token ids
    radii: torch.Tensor  # (C,) largest computed distance from the centre to a member
    sizes: torch.Tensor  # (C,) members per cluster, all >= 1 (the centre is a member)
    starts: torch.Tensor  # (C,) offset of each cluster's first member in ``members``
    members: torch.Tensor  # (vocabulary,) token ids grouped by cluster

    @classmethod
    def of(cls, space: EmbeddingSpace, memory_cap_bytes: int) -> Cover:
        """The cover of ``space``, cached per embedding digest like its diameter (it depends on the embedding only)."""
        path = cache_path(space, f"cover-c{CENTRES}", COVER_VERSION, "pt")
        if path.exists():
            return cls(**torch.load(path))
        cover = cls.build(space, memory_cap_bytes)
        buffer = io.BytesIO()
        torch.save({f.name: getattr(cover, f.name) for f in fields(cover)}, buffer)
        write_atomically(path, buffer.getvalue())
        return cover

    @classmethod
    def build(cls, space: EmbeddingSpace, memory_cap_bytes: int, n_centres: int = CENTRES) -> Cover:
        count = min(n_centres, space.size)
        centres = torch.randperm(space.size, generator=torch.Generator().manual_seed(COVER_SEED))[:count]
        nearest = torch.empty(space.size, dtype=torch.long)
        reach = torch.empty(space.size, dtype=torch.float64)
        step = max(1, memory_cap_bytes // (8 * (count + space.dim)))  # distances to the centres, gathered points
        for start in range(0, space.size, step):
            rows = torch.arange(start, min(start + step, space.size))
            reach[rows], nearest[rows] = space.distances(rows, centres).min(dim=1)
        sizes = torch.bincount(nearest, minlength=count)
        radii = torch.zeros(count, dtype=torch.float64).scatter_reduce_(0, nearest, reach, "amax")
        return cls(centres, radii, sizes, torch.cumsum(sizes, 0) - sizes, torch.argsort(nearest, stable=True))


@dataclass(frozen=True)
class Envelope:
    """Bounds U (k, C) on the weights of k distinct input tokens over each cluster, with their cumulative masses."""

    tokens: torch.Tensor
    bounds: torch.Tensor
    masses: torch.Tensor  # cumulative |C_j| U_j per row, what sample_rows searches
    expected_proposals: torch.Tensor  # estimated T / N per row

    def restricted(self, rows: torch.Tensor) -> Envelope:
        return Envelope(self.tokens[rows], self.bounds[rows], self.masses[rows], self.expected_proposals[rows])


@dataclass(frozen=True)
class ProposalSampler:
    """SanText at ``epsilon`` over ``space`` by proposals from ``cover`` (module docstring)."""

    space: EmbeddingSpace
    cover: Cover
    epsilon: float
    memory_cap_bytes: int

    def bytes_per_token(self) -> int:
        """Working memory of one distinct token's envelope: its point, bounds, masses, distances and weights."""
        return 8 * (self.space.dim + 4 * len(self.cover.centres))

    def envelope(self, tokens: torch.Tensor) -> Envelope:
        cover = self.cover
        to_centres = self.space.distances(tokens, cover.centres)
        margin = MARGIN_ROUNDINGS * self.space.rounding_bound
        nearest = (to_centres - cover.radii - margin).clamp_min_(0.0)
        bounds = self.weights(nearest).add_(exp_slack_units(self.space.size))
        typical = self.weights(to_centres)
        expected = (bounds * cover.sizes).sum(dim=1).double() / (typical * cover.sizes).sum(dim=1).double()
        return Envelope(tokens, bounds, cumulative(bounds * cover.sizes), expected)

    def weights(self, distances: torch.Tensor) -> torch.Tensor:
        return santext_weights(distances, self.epsilon, self.space.size)

    def draw(self, envelope: Envelope, rows: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One exact draw from the row law of envelope.tokens[rows[i]] for each i (module docstring).

        Each round makes a share of the expected number of proposals for every pending draw, in sequence,
        and keeps the first accepted one (the first success of independent proposals has the law of
        one accepted proposal), so few rounds are needed; the rows still pending are compacted
        first, so a round costs what its pending draws need. The expected number is an estimate
        (centre distances stand in for the row): a draw still pending after ``STEADY_ROUNDS`` doubles
        its proposals each round, up to ``ROUND_PROPOSALS`` per round in all, so an estimate that is
        far too low costs a few more rounds, not thousands.
        """
        out = torch.empty_like(rows)
        with single_threaded():
            self._rounds(envelope, rows, out, generator)
        return out

    def _rounds(self, envelope: Envelope, owners: torch.Tensor, out: torch.Tensor, generator: torch.Generator) -> None:
        pending = torch.arange(len(owners))
        rounds = 0
        while len(pending):
            used, owners = torch.unique(owners, return_inverse=True)
            envelope = envelope.restricted(used)
            share = ROUND_SHARE * 2.0 ** max(0, rounds - STEADY_ROUNDS)
            cap = max(MAX_TRIES, ROUND_PROPOSALS // len(owners))
            tries = (envelope.expected_proposals[owners] * share).ceil_().clamp_(1, cap).long()
            rounds += 1
            slot = torch.repeat_interleave(torch.arange(len(owners)), tries)
            accepted, proposal = self._propose(envelope, owners[slot], generator)
            first = torch.full((len(owners),), len(slot), dtype=torch.long)
            first.scatter_reduce_(0, slot[accepted], torch.arange(len(slot))[accepted], "amin")
            done = first < len(slot)
            out[pending[done]] = proposal[first[done]]
            pending, owners = pending[~done], owners[~done]

    def _propose(
        self, envelope: Envelope, owners: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One proposal for each entry of ``owners`` (rows of the envelope): (accepted, proposed token)."""
        cover = self.cover
        cluster = sample_rows(envelope.masses, owners, generator)
        bound = envelope.bounds[owners, cluster]
        offset = uniform_residues(cover.sizes[cluster] * bound, generator)
        proposal, residue = proposal_of(cover.members, cover.starts, cluster, offset, bound)
        weight = self.proposal_weights(envelope.tokens[owners], proposal)
        if bool((weight > bound).any()):
            raise PrivtuneError(
                "SanText's proposal envelope is below a weight it should bound; refusing to sample a distorted "
                "law. This is a bug: report it with the embedding and epsilon"
            )
        return residue < weight, proposal

    def proposal_weights(self, inputs: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
        """K of each (input, output) pair, in batches of moderate size."""
        batch = max(1, min(PROPOSAL_BATCH_BYTES, self.memory_cap_bytes) // PROPOSAL_BYTES)
        pieces = [
            self.weights(self.space.pair_distances(inputs[i : i + batch], outputs[i : i + batch]))
            for i in range(0, len(inputs), batch)
        ]
        return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)
