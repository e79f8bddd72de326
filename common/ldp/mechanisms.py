"""Token-level exponential mechanisms over an embedding space: SanText and CusText.

SanText (Yue et al., ACL Findings 2021) draws the replacement y of token x with probability
proportional to exp(-eps * d(x, y) / 2) over the whole vocabulary. For any tokens x, x' and output
y the ratio P(y|x) / P(y|x') is at most exp(eps * d(x, x')) (triangle inequality, once in the
numerator and once in the normaliser): eps*d metric-LDP per token, hence pure (eps * D)-LDP with D
the diameter of the space.

CusText (Chen et al., ACL Findings 2023) partitions the vocabulary into cells of k..2k-1 nearby
tokens (``geometry.custext_partition``); a token is replaced by a member of its own cell with
probability proportional to exp(-eps * d(x, y) / (2 * max_y' d(x, y'))). The normalised distance
lies in [0, 1], so any two tokens of the same cell are eps-indistinguishable; tokens of different
cells are not indistinguishable at all (the cell is revealed). The guarantee reported is the exact
largest log-ratio over all cells, computed from the probabilities actually used.

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
from privtune.common.ldp.geometry import BYTES_PER_FLOAT64, custext_partition, diameter_bound
from privtune.common.ldp.sampling import sample_rows

ARRAYS_PER_ROW = 2  # distances (turned into weights in place) and their cumulative sums


@dataclass(frozen=True)
class TokenGuarantee:
    """What one perturbed token guarantees, computed for a mechanism and its embedding.

    ``token_epsilon``: pure eps-LDP for any two input tokens within ``scope``.
    ``metric_epsilon``/``metric_slack``: where defined (SanText), the tighter metric guarantee
    eps_metric * d(x, x') + slack for any two tokens x, x'; the slack covers distance rounding.
    """

    token_epsilon: float
    scope: str
    metric_epsilon: float | None = None
    metric_slack: float = 0.0
    diameter: float | None = None


class Mechanism(ABC):
    """A per-token randomiser over an embedding space, sampled in memory-bounded chunks of distinct tokens."""

    name: str

    def __init__(self, space: EmbeddingSpace, epsilon: float, memory_cap_mb: float = 256.0) -> None:
        if not (epsilon > 0 and math.isfinite(epsilon)):
            raise PrivtuneError(f"epsilon must be a positive finite number, got {epsilon}")
        if memory_cap_mb <= 0:
            raise PrivtuneError(f"the memory cap must be positive, got {memory_cap_mb} MB")
        self.space = space
        self.epsilon = float(epsilon)
        self.memory_cap_bytes = int(memory_cap_mb * (1 << 20))

    @abstractmethod
    def _rows(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Output distributions of distinct tokens: (unnormalised weights, candidate ids or None for all ids)."""

    @abstractmethod
    def bytes_per_row(self) -> int:
        """Working memory one distinct token's distribution needs while it is sampled."""

    @property
    @abstractmethod
    def guarantee(self) -> TokenGuarantee: ...

    @property
    def rows_per_chunk(self) -> int:
        return max(1, self.memory_cap_bytes // self.bytes_per_row())

    def _chunks(self, ids: torch.Tensor):
        """Yield (distinct tokens' weights, candidates, positions in ids, row of each position)."""
        sorted_ids, order = ids.sort(stable=True)
        tokens, counts = torch.unique_consecutive(sorted_ids, return_counts=True)
        grouped = torch.repeat_interleave(torch.arange(len(tokens)), counts)
        step = self.rows_per_chunk
        for start in range(0, len(tokens), step):
            stop = min(start + step, len(tokens))
            lo, hi = torch.searchsorted(grouped, torch.tensor([start, stop])).tolist()
            weights, candidates = self._rows(tokens[start:stop])
            yield weights, candidates, order[lo:hi], grouped[lo:hi] - start

    def sample(self, ids: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One independent draw per position of ``ids`` (ids must lie in the space)."""
        out = torch.empty_like(ids)
        for weights, candidates, positions, rows in self._chunks(ids):
            columns = sample_rows(weights, rows, generator)
            out[positions] = columns if candidates is None else candidates[rows, columns]
        return out

    def probabilities(self, ids: torch.Tensor) -> torch.Tensor:
        """Dense output distribution for each position, (len(ids), vocabulary size); for inspection and tests."""
        out = torch.zeros(len(ids), self.space.size, dtype=torch.float64)
        for weights, candidates, positions, rows in self._chunks(ids):
            probs = weights / weights.sum(dim=1, keepdim=True)
            if candidates is None:
                out[positions] = probs[rows]
            else:
                valid = candidates[rows] >= 0
                out[positions[:, None].expand_as(valid)[valid], candidates[rows][valid]] = probs[rows][valid]
        return out


class SanText(Mechanism):
    name = "santext"

    def bytes_per_row(self) -> int:
        return ARRAYS_PER_ROW * BYTES_PER_FLOAT64 * self.space.size

    def _rows(self, tokens: torch.Tensor) -> tuple[torch.Tensor, None]:
        # every row holds its own token at distance 0, so the largest weight is exactly 1: no overflow,
        # and the row total never underflows
        return self.space.distances(tokens).mul_(-self.epsilon / 2.0).exp_(), None

    @cached_property
    def guarantee(self) -> TokenGuarantee:
        diameter = diameter_bound(self.space, self.memory_cap_bytes)
        slack = 2.0 * self.epsilon * self.space.rounding_bound
        return TokenGuarantee(
            token_epsilon=self.epsilon * diameter + slack,
            scope=f"any two tokens of the {self.space.name} vocabulary ({self.space.size} tokens)",
            metric_epsilon=self.epsilon,
            metric_slack=slack,
            diameter=diameter,
        )


class CusText(Mechanism):
    name = "custext"

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
        """Row t: token t's output distribution over the members of its cell (in the cell's member order).

        Distances are computed per cell (a small Gram matrix), in chunks of cells under the memory cap.
        """
        n_cells, width = self.members.shape
        table = torch.zeros(self.space.size, width, dtype=torch.float64)
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
            logits = (normalised * (-self.epsilon / 2.0)).masked_fill_(~pair_valid, -math.inf)
            probs = torch.softmax(logits.masked_fill(~valid[:, :, None], 0.0), dim=2)
            table[members[valid]] = probs[valid]
        return table

    def bytes_per_row(self) -> int:
        return ARRAYS_PER_ROW * BYTES_PER_FLOAT64 * self.members.shape[1]

    def _rows(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.table[tokens], self.members[self.cells[tokens]]

    @cached_property
    def guarantee(self) -> TokenGuarantee:
        """Largest |log P(y|x) - log P(y|x')| over x, x', y of one cell, from the probabilities used."""
        n_cells, width = self.members.shape
        logp = self.table.log()
        index = self.cells[:, None].expand_as(logp)
        highest = torch.full((n_cells, width), -math.inf, dtype=torch.float64).scatter_reduce_(0, index, logp, "amax")
        lowest = torch.full((n_cells, width), math.inf, dtype=torch.float64).scatter_reduce_(0, index, logp, "amin")
        token_epsilon = float((highest - lowest)[self.members >= 0].max())
        return TokenGuarantee(
            token_epsilon=token_epsilon,
            scope=f"two tokens in the same CusText cell ({self.top_k} to {width} tokens of the {self.space.name} "
            "vocabulary); the cell itself is revealed",
        )
