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
    with exactly one :data:`END` per row. Each rotation's leading characters (as dense ranks,
    END = 0) are packed into one int64 key. When a whole rotation fits (patch 8 over an alphabet
    below 128 does), a plain row sort of the keys is the BWT: a rotation's last character sits
    in its key's lowest bits. Otherwise keys are argsorted and rows whose prefixes tie are
    refined by prefix doubling, O(n log n) per patch either way.
    """
    patches = np.asarray(patches)
    if patches.ndim != 2:
        raise ValueError(f"expected a (k, n) array of code points, got shape {patches.shape}")
    k, n = patches.shape
    m = n + 1
    if k == 0:
        return np.empty((0, m), dtype=np.int64)
    alphabet, dense = _dense_ranks(patches)
    bits = int(alphabet.size).bit_length()
    # Rotation-major layout (m, k): every step below is a contiguous whole-batch operation.
    ranks = np.zeros((m, k), dtype=np.int64)
    ranks[:n] = dense.T
    width = min(m, _KEY_BITS // bits)
    key = _rotation_keys(ranks, width, bits)
    if width == m:
        last = np.ascontiguousarray((np.sort(key, axis=0) & ((1 << bits) - 1)).T)
    else:
        key, ranks = np.ascontiguousarray(key.T), np.ascontiguousarray(ranks.T)
        order = np.argsort(key, axis=1)
        _break_ties(order, key, ranks, width)
        # The last character of the rotation starting at i is the one at i - 1 (cyclically).
        last = np.take_along_axis(np.roll(ranks, 1, axis=1), order, axis=1)
    return np.concatenate(([END], alphabet))[last]


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
    # Stable sort of each row = plain sort of keys (char, position), END (-1) first; the position
    # rides in the low bits, so the sorted keys themselves are the first-to-last mapping.
    bits = (m - 1).bit_length()
    flat_next = np.sort(((last + 1) << bits) | np.arange(m), axis=1)
    flat_next &= (1 << bits) - 1
    flat_next += (np.arange(k) * m)[:, None]
    flat_next = flat_next.ravel()
    flat_last = last.ravel()
    is_end = last == END
    position = flat_next[np.arange(k) * m + np.argmax(is_end, axis=1)]
    out = np.empty((m, k), dtype=np.int64)  # step-major: each step writes one contiguous row
    for step in range(m):
        out[step] = flat_last[position]
        position = flat_next[position]
    # A single cycle meets END only at its last step.
    valid = (is_end.sum(axis=1) == 1) & (out[m - 1] == END) & ~(out[: m - 1] == END).any(axis=0)
    return out[: m - 1].T, valid


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


def _rotation_keys(ranks: np.ndarray, width: int, bits: int) -> np.ndarray:
    """``key[i, r]``: ranks ``ranks[i : i + width, r]`` (cyclically) packed big-endian."""
    m, k = ranks.shape
    key = np.empty((m, k), dtype=np.int64)
    first = key[0]
    first[:] = 0
    for j in range(width):
        first <<= bits
        first |= ranks[j]
    mask = (1 << (bits * width)) - 1
    for i in range(1, m):
        np.left_shift(key[i - 1], bits, out=key[i])
        key[i] &= mask
        key[i] |= ranks[(i + width - 1) % m]
    return key


def _break_ties(order: np.ndarray, key: np.ndarray, ranks: np.ndarray, width: int) -> None:
    """Finish sorting (in place) the rows of ``order`` where rotations share a ``width`` prefix.

    Few rows have such ties (only near-periodic patches), so prefix doubling runs on those only:
    each round ranks rotations by their first ``span`` characters, then sorts pairs of ranks
    ``(rank[i], rank[i + span])``, doubling ``span`` until all ranks differ. END is unique, so
    rotations always end up distinct.
    """
    sorted_key = np.take_along_axis(key, order, axis=1)
    rows = np.flatnonzero((sorted_key[:, 1:] == sorted_key[:, :-1]).any(axis=1))
    if rows.size == 0:
        return
    m = ranks.shape[1]
    sub_order, sub_sorted, span = order[rows], sorted_key[rows], width
    while True:
        rank_sorted = np.zeros(sub_sorted.shape, dtype=np.int64)
        np.cumsum(sub_sorted[:, 1:] != sub_sorted[:, :-1], axis=1, out=rank_sorted[:, 1:])
        if bool((rank_sorted[:, -1] == m - 1).all()):
            break
        rank = np.empty_like(rank_sorted)
        np.put_along_axis(rank, sub_order, rank_sorted, axis=1)
        pair = rank * m + np.roll(rank, -span, axis=1)
        sub_order = np.argsort(pair, axis=1)
        sub_sorted = np.take_along_axis(pair, sub_order, axis=1)
        span *= 2
    order[rows] = sub_order
