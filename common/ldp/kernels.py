"""Compiled loops for the two steps of the samplers that torch can only do through large temporaries.

Why: a proposal needs one dot product of two gathered embedding rows, and a draw one binary search
in one row's cumulative sums. In torch both go through gathered copies (two 576-wide float64 rows
per proposal, one padded rectangle per batch of searches), which cost more than the arithmetic;
here each is a loop that reads only what it needs (the rows as int32 grid integers). Neither loop
changes a value the law depends on:

- :func:`pair_squared_distances` returns exact squared distances (integers of squared grid units,
  ``embedding.EmbeddingSpace``: exact in float64 in any summation order, which is why the compiler
  may reassociate the dot product into vector lanes), so the distances derived from them by the same
  torch operations as a whole row's have the same bits;
- :func:`search_rows` is an integer binary search with the semantics of ``torch.searchsorted(...,
  right=True)``: the first column whose cumulative sum exceeds the residue.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True, fastmath={"reassoc"})
def pair_squared_distances(
    units: np.ndarray, sq_units: np.ndarray, rows: np.ndarray, others: np.ndarray, scale: float
) -> np.ndarray:
    """|x - y|^2 = |x|^2 + |y|^2 - 2 x.y for x = units[rows[i]], y = units[others[i]], times ``scale``.

    ``units`` are the points as integers of grid units (int32: half the bytes to gather of float64),
    ``sq_units`` their squared norms and ``scale`` the squared grid unit, a power of two: every step
    is exact in float64, so the result is the exact squared distance, not clamped at 0.
    """
    out = np.empty(len(rows), dtype=np.float64)
    dim = units.shape[1]
    for i in range(len(rows)):
        x, y = rows[i], others[i]
        dot = 0.0
        for k in range(dim):
            dot += np.float64(units[x, k]) * np.float64(units[y, k])
        out[i] = (-2.0 * dot + sq_units[y] + sq_units[x]) * scale
    return out


@numba.njit(cache=True, nogil=True)
def search_rows(cumsum: np.ndarray, rows: np.ndarray, residues: np.ndarray) -> np.ndarray:
    """For each i the first column y with cumsum[rows[i], y] > residues[i] (non-decreasing rows)."""
    out = np.empty(len(rows), dtype=np.int64)
    width = cumsum.shape[1]
    for i in range(len(rows)):
        row, residue = rows[i], residues[i]
        lo, hi = 0, width
        while lo < hi:
            mid = (lo + hi) >> 1
            if cumsum[row, mid] <= residue:
                lo = mid + 1
            else:
                hi = mid
        out[i] = lo
    return out
