"""Burrows–Wheeler transform of many short patches at once, with a virtual end marker.

The original code appended a sentinel *character* and relied on it sorting lowest, which broke for
every character below it (newline, tab, NUL) and made the sentinel itself unencodable. Here the end
marker is :data:`END`, the integer -1: it is not a code point, so it cannot collide with any
character, and it sorts below all of them by construction. Patches are 8–16 characters, so
per-patch Python work dominates a naive implementation; both directions below run as a handful of
numpy operations over a whole ``(k, n)`` batch of equal-length patches instead.
"""

from __future__ import annotations

import numpy as np

END = -1
"""Virtual end-of-patch marker in a BWT column (sorts below every code point, is none)."""

_KEY_BITS = 63


def bwt_batch(patches: np.ndarray) -> np.ndarray:
    """Last column of the sorted rotations of ``patch + END`` for each row of ``patches``.

    ``patches`` is a ``(k, n)`` integer array of code points (>= 0). Returns ``(k, n + 1)`` int64
    with exactly one :data:`END` per row. Rotations are sorted by packing each rotation's leading
    characters (as dense ranks, END = 0) into one int64 key; when a whole rotation does not fit,
    prefix doubling refines the ranks, so the cost is O(n log n) per patch either way.
    """
    patches = np.asarray(patches, dtype=np.int64)
    if patches.ndim != 2:
        raise ValueError(f"expected a (k, n) array of code points, got shape {patches.shape}")
    k, n = patches.shape
    m = n + 1
    if k == 0:
        return np.empty((0, m), dtype=np.int64)
    alphabet, dense = _dense_ranks(patches)
    ranks = np.empty((k, m), dtype=np.int64)
    ranks[:, :n] = dense
    ranks[:, n] = 0
    order = _rotation_order(ranks, bits=int(alphabet.size).bit_length())
    # The last character of the rotation starting at i is the one at i - 1 (cyclically).
    previous = np.roll(ranks, 1, axis=1)
    last = np.take_along_axis(previous, order, axis=1)
    decode = np.concatenate(([END], alphabet))
    return decode[last]


def inverse_bwt_batch(last: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Invert :func:`bwt_batch` by LF-mapping: ``(k, m)`` columns -> ``(k, m - 1)`` patches, valid.

    A row is valid when it holds exactly one :data:`END` and its LF permutation is a single cycle
    (otherwise it is no BWT of anything; model output can be like that). Invalid rows come back
    with ``valid[i] == False`` and meaningless content, never an exception.
    """
    last = np.asarray(last, dtype=np.int64)
    k, m = last.shape
    if k == 0:
        return np.empty((0, max(m - 1, 0)), dtype=np.int64), np.zeros(0, dtype=bool)
    cols = np.arange(m, dtype=np.int64)
    # Stable sort of each row = sort of the unique keys (char, position); END (-1) sorts first.
    keys = (last + 1) * m + cols
    first_to_last = np.argsort(keys, axis=1)
    flat_next = (first_to_last + (np.arange(k, dtype=np.int64) * m)[:, None]).ravel()
    flat_last = last.ravel()
    is_end = last == END
    row_starts = np.arange(k, dtype=np.int64) * m
    position = flat_next[row_starts + np.argmax(is_end, axis=1)]
    out = np.empty((k, m), dtype=np.int64)
    for step in range(m):
        out[:, step] = flat_last[position]
        position = flat_next[position]
    # A single cycle meets END only at its last step.
    valid = (is_end.sum(axis=1) == 1) & (np.argmax(out == END, axis=1) == m - 1)
    return out[:, : m - 1], valid


def _dense_ranks(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted distinct values and each value's 1-based rank among them (0 is left for END)."""
    top = int(values.max()) + 1
    if top <= 4 * values.size + 65536:
        present = np.zeros(top, dtype=bool)
        present[values.ravel()] = True
        rank_of = np.cumsum(present)
        return np.flatnonzero(present), rank_of[values]
    alphabet, inverse = np.unique(values, return_inverse=True)
    return alphabet, inverse.reshape(values.shape) + 1


def _rotation_order(ranks: np.ndarray, bits: int) -> np.ndarray:
    """Per row, the start positions of the rotations in sorted order (rotations are all distinct)."""
    k, m = ranks.shape
    doubled = np.concatenate([ranks, ranks], axis=1)
    width = max(1, min(m, _KEY_BITS // bits))
    key = np.zeros((k, m), dtype=np.int64)
    for j in range(width):
        key <<= bits
        key |= doubled[:, j : j + m]
    order = np.argsort(key, axis=1)
    if width == m:
        return order
    # Prefix doubling: ranks of the first `width` characters, then of 2*width, 4*width, ...
    span = width
    while True:
        sorted_key = np.take_along_axis(key, order, axis=1)
        new_sorted = np.zeros((k, m), dtype=np.int64)
        np.cumsum(sorted_key[:, 1:] != sorted_key[:, :-1], axis=1, out=new_sorted[:, 1:])
        if span >= m or bool((new_sorted[:, -1] == m - 1).all()):
            return order
        rank = np.empty_like(new_sorted)
        np.put_along_axis(rank, order, new_sorted, axis=1)
        key = rank * m + np.roll(rank, -span, axis=1)
        order = np.argsort(key, axis=1)
        span *= 2
