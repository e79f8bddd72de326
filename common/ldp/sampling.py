"""Exact, vectorised sampling from many categorical distributions at once.

The mechanisms need one draw per input token from that token's distribution over the vocabulary.
Gumbel-max would need a vocabulary-sized noise vector per token, which costs as much as computing
the distances; inverse-CDF sampling needs one random number per token, so the weights are computed
once per distinct token and each occurrence costs a binary search in its row's cumulative sums.

The uniform draw is an integer i < 2^52 scaled to i / 2^52 of the row's total weight t, so output j
is drawn with its float64 probability to within 2^-52, and an output of weight 0 never. The scaled
target stays below t (t - t*2^-52 rounds below t), so the search always lands on a column.
"""

from __future__ import annotations

import torch

UNIFORM_BITS = 52
BATCHED_OCCURRENCES = 64  # rows with at most this many draws are searched together, padded to a rectangle


def sample_rows(weights: torch.Tensor, rows: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """For each entry r of ``rows``, a column index drawn with probability proportional to ``weights[r]``.

    ``weights`` is (m, k), non-negative, every row with a positive sum; it need not be normalised.
    """
    cdf = weights.to(torch.float64).cumsum(dim=1)
    draws = torch.randint(0, 1 << UNIFORM_BITS, (len(rows),), generator=generator, dtype=torch.long)
    targets = draws.to(torch.float64).mul_(2.0**-UNIFORM_BITS).mul_(cdf[rows, -1])
    out = torch.empty(len(rows), dtype=torch.long)
    already_grouped = len(rows) < 2 or bool((rows[1:] >= rows[:-1]).all())
    order = torch.arange(len(rows)) if already_grouped else torch.argsort(rows, stable=True)
    grouped = rows[order]
    counts = torch.bincount(rows, minlength=len(cdf))
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(rows)) - starts[grouped]
    light = counts[grouped] <= BATCHED_OCCURRENCES
    if bool(light.any()):
        width = int(counts[counts <= BATCHED_OCCURRENCES].max())
        padded = torch.zeros(len(cdf), width, dtype=torch.float64)
        padded[grouped[light], rank[light]] = targets[order[light]]
        found = torch.searchsorted(cdf, padded, right=True)
        out[order[light]] = found[grouped[light], rank[light]]
    for row in (counts > BATCHED_OCCURRENCES).nonzero().squeeze(1).tolist():
        positions = order[int(starts[row]) : int(starts[row] + counts[row])]
        out[positions] = torch.searchsorted(cdf[row], targets[positions], right=True)
    return out
