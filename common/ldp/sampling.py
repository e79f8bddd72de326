"""Exact, vectorised sampling from many categorical distributions at once.

The mechanisms need one draw per input token from that token's distribution over the vocabulary.
Gumbel-max would need a vocabulary-sized noise vector per token, which costs as much as computing
the distances; inverse-CDF sampling needs one random integer per token, so rows are computed once
per distinct token and each occurrence costs a binary search.

Every row's CDF is quantised to integer ticks of 2^-52 and all rows are searched at once by
offsetting row r's ticks by r * (2^52 + 1) in int64: output j of a row is then drawn with probability
exactly (tick_j - tick_{j-1}) / 2^52, i.e. its float64 probability to within 2^-52 (no float
comparisons whose rounding depends on the row's position).
"""

from __future__ import annotations

import torch

TICK_BITS = 52
TICKS = 1 << TICK_BITS
ROWS_PER_SEARCH = 1 << (62 - TICK_BITS)  # keeps row * (TICKS + 1) + TICKS below 2^63


def sample_rows(probs: torch.Tensor, rows: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """For each entry r of ``rows``, a column index drawn from the distribution ``probs[r]``.

    ``probs`` is (m, k), non-negative, each row with a positive sum (it is normalised here).
    """
    out = torch.empty(len(rows), dtype=torch.long)
    for start in range(0, probs.shape[0], ROWS_PER_SEARCH):
        block = probs[start:start + ROWS_PER_SEARCH].to(torch.float64)
        selected = ((rows >= start) & (rows < start + len(block))).nonzero().squeeze(1)
        if len(selected):
            out[selected] = _search(block, rows[selected] - start, generator)
    return out


def _search(probs: torch.Tensor, rows: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    m, k = probs.shape
    cdf = probs.cumsum(dim=1)
    ticks = (cdf / cdf[:, -1:] * TICKS).floor_().to(torch.long)
    ticks[:, -1] = TICKS
    offsets = torch.arange(m, dtype=torch.long) * (TICKS + 1)
    keys = (ticks + offsets[:, None]).reshape(-1)
    draws = torch.randint(0, TICKS, (len(rows),), generator=generator, dtype=torch.long)
    return torch.searchsorted(keys, offsets[rows] + draws, right=True) - rows * k
