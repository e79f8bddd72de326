"""Token-level exponential mechanisms over an embedding space: SanText and CusText.

SanText (Yue et al., ACL Findings 2021) draws the replacement y of token x with probability
proportional to exp(-eps * d(x, y) / 2) over the whole vocabulary. For any tokens x, x' and output
y the ratio P(y|x) / P(y|x') is at most exp(eps * d(x, x')) (triangle inequality, once in the
numerator and once in the normaliser): eps*d metric-LDP per token, hence pure (eps * D)-LDP with D
the diameter of the space. Its scope is ``metric``: the guarantee holds between any two tokens.

CusText (Chen et al., ACL Findings 2023) partitions the vocabulary into cells of k..2k-1 nearby
tokens (``geometry.custext_partition``); a token is replaced by a member of its own cell with
probability proportional to exp(-eps * d(x, y) / (2 * max_y' d(x, y'))). The normalised distance
lies in [0, 1], so any two tokens of the same cell are eps-indistinguishable; tokens of different
cells are not indistinguishable at all (the cell is revealed). Its scope is ``within-cell``.

What is sampled is the integer law of :mod:`common.ldp.sampling`: weight floor(w * 2^m) + F for
every output, drawn exactly. The floor F mixes the design with the uniform law in weight space,
which never increases a ratio of the design (each factor of the ratio is a max of 1 and the
design's), and it bounds every ratio on its own (``sampling.floor_cap``). SanText's printed
guarantee is derived for that law (quantisation and float rounding included); CusText's is the
exact largest log-ratio of the integer law itself.

Both mechanisms perturb every token, whitespace and special tokens included: exempting any class
of tokens would pass it through unchanged and leak it.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cached_property

import torch

from privtune.common.errors import PrivtuneError
from privtune.common.ldp.embedding import EmbeddingSpace
from privtune.common.ldp.envelope import PROPOSAL_COST, Cover, ProposalSampler, santext_weights
from privtune.common.ldp.geometry import BYTES_PER_FLOAT64, custext_partition, diameter_bound
from privtune.common.ldp.sampling import (
    cumulative,
    floor_cap,
    implemented_law,
    quantization_error,
    quantize,
    sample_rows,
)

ARRAYS_PER_ROW = 2  # distances (turned into weights in place) and their integer cumulative sums
LOG_EVALUATION_MARGIN = 1e-12
"""Covers the float64 evaluation of log(K / N) when CusText's exact largest log-ratio is computed."""
METRIC = "metric"
WITHIN_CELL = "within-cell"


@dataclass(frozen=True)
class TokenGuarantee:
    """What one perturbed token guarantees, computed for a mechanism and its embedding.

    ``token_epsilon``: eps-LDP for any two input tokens within ``scope`` (``metric``: any two tokens
    of the vocabulary; ``within-cell``: two tokens of the same CusText cell, while the cell itself
    is revealed); ``domain`` says which tokens those are in words. Guarantees of different scopes are
    different promises and must never be added together.
    ``metric_epsilon``/``metric_slack``: where defined (SanText), the tighter metric guarantee
    eps_metric * d(x, x') + slack for any two tokens x, x'; the slack covers distance rounding and
    the sampler's quantisation.
    """

    token_epsilon: float
    scope: str
    domain: str
    metric_epsilon: float | None = None
    metric_slack: float = 0.0
    diameter: float | None = None


def check_parameters(epsilon: float, memory_cap_mb: float) -> None:
    """Refuse an epsilon or memory cap that is not a positive finite number (NaN included)."""
    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise PrivtuneError(f"epsilon must be a positive finite number, got {epsilon}")
    if not (memory_cap_mb > 0 and math.isfinite(memory_cap_mb)):
        raise PrivtuneError(f"the memory cap must be a positive finite number of MB, got {memory_cap_mb}")


class Mechanism(ABC):
    """A per-token randomiser over an embedding space, sampled in memory-bounded chunks of distinct tokens."""

    name: str
    scope: str

    def __init__(self, space: EmbeddingSpace, epsilon: float, memory_cap_mb: float = 256.0) -> None:
        check_parameters(epsilon, memory_cap_mb)
        self.space = space
        self.epsilon = float(epsilon)
        self.memory_cap_bytes = int(memory_cap_mb * (1 << 20))

    @abstractmethod
    def _rows(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Output laws of distinct tokens: (integer cumulative weights, candidate ids or None for all ids)."""

    @abstractmethod
    def bytes_per_row(self) -> int:
        """Working memory one distinct token's distribution needs while it is sampled."""

    @property
    @abstractmethod
    def guarantee(self) -> TokenGuarantee: ...

    @property
    def rows_per_chunk(self) -> int:
        return max(1, self.memory_cap_bytes // self.bytes_per_row())

    def _groups(self, ids: torch.Tensor, step: int | None = None):
        """Yield (a chunk of ``step`` distinct tokens, positions in ids, row of each position within the chunk)."""
        sorted_ids, order = ids.sort(stable=True)
        tokens, counts = torch.unique_consecutive(sorted_ids, return_counts=True)
        grouped = torch.repeat_interleave(torch.arange(len(tokens)), counts)
        step = self.rows_per_chunk if step is None else step
        for start in range(0, len(tokens), step):
            stop = min(start + step, len(tokens))
            lo, hi = torch.searchsorted(grouped, torch.tensor([start, stop])).tolist()
            yield tokens[start:stop], order[lo:hi], grouped[lo:hi] - start

    def sample(self, ids: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One independent draw per position of ``ids`` (ids must lie in the space)."""
        return self.sample_by_rows(ids, generator)

    def sample_by_rows(self, ids: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Draws from each distinct token's whole integer row, computed once for all its positions."""
        out = torch.empty_like(ids)
        for tokens, positions, rows in self._groups(ids):
            out[positions] = self._draw(tokens, rows, generator)
        return out

    def _draw(self, tokens: torch.Tensor, rows: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        # a function of its own so that one chunk's rows are freed before the next chunk's are computed
        cumsum, candidates = self._rows(tokens)
        columns = sample_rows(cumsum, rows, generator)
        return columns if candidates is None else candidates[rows, columns]

    def probabilities(self, ids: torch.Tensor) -> torch.Tensor:
        """The exact law sampled for each position, (len(ids), vocabulary size), each entry rounded once to float64."""
        out = torch.zeros(len(ids), self.space.size, dtype=torch.float64)
        for tokens, positions, rows in self._groups(ids):
            cumsum, candidates = self._rows(tokens)
            probs = implemented_law(cumsum)
            if candidates is None:
                out[positions] = probs[rows]
            else:
                valid = candidates[rows] >= 0
                out[positions[:, None].expand_as(valid)[valid], candidates[rows][valid]] = probs[rows][valid]
        return out


class SanText(Mechanism):
    """SanText over the whole vocabulary; see the module docstring for the law and its guarantee."""

    name = "santext"
    scope = METRIC

    def bytes_per_row(self) -> int:
        return ARRAYS_PER_ROW * BYTES_PER_FLOAT64 * self.space.size

    def _rows(self, tokens: torch.Tensor) -> tuple[torch.Tensor, None]:
        # every row holds its own token at distance exactly 0, so its largest weight is exactly 1,
        # which quantize and floor_cap rely on
        return cumulative(santext_weights(self.space.distances(tokens), self.epsilon, self.space.size)), None

    @cached_property
    def proposals(self) -> ProposalSampler:
        cover = Cover.of(self.space, self.memory_cap_bytes)
        return ProposalSampler(self.space, cover, self.epsilon, self.memory_cap_bytes)

    def sample(self, ids: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Each distinct token by proposals or by its whole row, whichever costs less: the law is the same.

        See ``common.ldp.envelope``: a row costs one distance per vocabulary token, a draw by
        proposals about ``PROPOSAL_COST`` times the expected number of proposals.
        """
        out = torch.empty_like(ids)
        by_row = torch.zeros(len(ids), dtype=torch.bool)
        step = max(1, self.memory_cap_bytes // self.proposals.bytes_per_token())
        for tokens, positions, rows in self._groups(ids, step):
            envelope = self.proposals.envelope(tokens)
            counts = torch.bincount(rows, minlength=len(tokens))
            cheap = (counts * envelope.expected_proposals * PROPOSAL_COST < self.space.size)[rows]
            out[positions[cheap]] = self.proposals.draw(envelope, rows[cheap], generator)
            by_row[positions[~cheap]] = True
        out[by_row] = self.sample_by_rows(ids[by_row], generator)
        return out

    @cached_property
    def guarantee(self) -> TokenGuarantee:
        """Derived for the integer law sampled, with computed distances within rho of the exact ones.

        Write I_x(y) = w_xy 2^m + F with w = exp(-eps d'/2) from computed distances d'. The design
        ratio (I_xy / I_x'y) (sum I_x' / sum I_x) has each factor at most max(1, exp(eps (d(x, x') + 2 rho) / 2)),
        so it is at most exp(eps d(x, x') + 2 eps rho), and at most exp(floor_cap) whatever the
        distances. The law drawn is within exp(+-eta) of the design (``sampling.quantization_error``).
        Hence per token: metric eps * d + 2 eps rho + 2 eta, and pure min(eps D + 2 eps rho, floor_cap) + 2 eta.
        """
        diameter = diameter_bound(self.space, self.memory_cap_bytes)
        distance_slack = 2.0 * self.epsilon * self.space.rounding_bound
        sampler_slack = 2.0 * quantization_error()
        return TokenGuarantee(
            token_epsilon=min(self.epsilon * diameter + distance_slack, floor_cap(self.space.size)) + sampler_slack,
            scope=self.scope,
            domain=f"any two tokens of the {self.space.name} vocabulary ({self.space.size} tokens)",
            metric_epsilon=self.epsilon,
            metric_slack=distance_slack + sampler_slack,
            diameter=diameter,
        )


class CusText(Mechanism):
    """CusText within cells of nearby tokens; see the module docstring for the law and its guarantee."""

    name = "custext"
    scope = WITHIN_CELL

    def __init__(self, space: EmbeddingSpace, epsilon: float, top_k: int = 20, memory_cap_mb: float = 256.0) -> None:
        super().__init__(space, epsilon, memory_cap_mb)
        self.top_k = int(top_k)
        self.cells = custext_partition(space, self.top_k, self.memory_cap_bytes)
        sizes = torch.bincount(self.cells)
        by_cell = torch.argsort(self.cells, stable=True)
        starts = torch.cumsum(sizes, 0) - sizes
        slot = torch.arange(space.size) - starts[self.cells[by_cell]]
        self.members = torch.full((len(sizes), int(sizes.max())), -1, dtype=torch.long)
        self.members[self.cells[by_cell], slot] = by_cell
        self.table = self._token_table()

    def _token_table(self) -> torch.Tensor:
        """Row t: token t's integer cumulative weights over the members of its cell (in the cell's member order).

        Distances are computed per cell (a small Gram matrix), in chunks of cells under the memory cap.
        A token's own weight is exactly 1 (normalised distance 0), as ``sampling.quantize`` expects.
        """
        n_cells, width = self.members.shape
        table = torch.zeros(self.space.size, width, dtype=torch.long)
        step = max(1, self.memory_cap_bytes // (BYTES_PER_FLOAT64 * width * (self.space.dim + 3 * width)))
        eye = torch.eye(width, dtype=torch.bool)
        for start in range(0, n_cells, step):
            members = self.members[start : start + step]
            valid = members >= 0
            points = self.space.points[members.clamp_min(0)]
            sq = self.space.sq_norms[members.clamp_min(0)]
            dist = (sq[:, :, None] + sq[:, None, :] - 2.0 * points @ points.transpose(1, 2)).clamp_min_(0.0).sqrt_()
            pair_valid = valid[:, :, None] & valid[:, None, :]
            dist = dist.masked_fill_(eye, 0.0).masked_fill_(~pair_valid, 0.0)
            scale = dist.amax(dim=2, keepdim=True)
            normalised = dist / torch.where(scale > 0, scale, 1.0)
            weights = quantize(normalised.mul_(-self.epsilon / 2.0).exp_(), valid=pair_valid)
            table[members[valid]] = cumulative(weights[valid])
        return table

    def bytes_per_row(self) -> int:
        return ARRAYS_PER_ROW * BYTES_PER_FLOAT64 * self.members.shape[1]

    def _rows(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.table[tokens], self.members[self.cells[tokens]]

    @cached_property
    def guarantee(self) -> TokenGuarantee:
        """Largest |log P(y|x) - log P(y|x')| over x, x', y of one cell, from the exact integer law sampled."""
        n_cells, width = self.members.shape
        logp = implemented_law(self.table).log()
        index = self.cells[:, None].expand_as(logp)
        highest = torch.full((n_cells, width), -math.inf, dtype=torch.float64).scatter_reduce_(0, index, logp, "amax")
        lowest = torch.full((n_cells, width), math.inf, dtype=torch.float64).scatter_reduce_(0, index, logp, "amin")
        token_epsilon = float((highest - lowest)[self.members >= 0].max()) + LOG_EVALUATION_MARGIN
        return TokenGuarantee(
            token_epsilon=token_epsilon,
            scope=self.scope,
            domain=f"two tokens in the same CusText cell ({self.top_k} to {width} tokens of the {self.space.name} "
            "vocabulary); the cell itself is revealed",
        )
