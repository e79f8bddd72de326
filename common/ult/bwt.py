"""Bijective Burrows–Wheeler transform (BWTS, Gil & Scott) of many short patches at once.

The BWTS needs no end marker: a patch is cut into its Lyndon factorisation ``w1 >= w2 >= ...``,
the rotations of all factors are sorted by their infinite repetitions (omega order), and the
last characters of the sorted rotations form the transform. Every string of length n is the
transform of exactly one string of length n, so :func:`inverse_bwts_batch` accepts *any* column,
which is what lets a model's output always decode.

Patches are 8–16 characters, so per-patch Python work would dominate; both directions run as a
handful of numpy operations over a whole ``(k, n)`` batch of equal-length patches:

* forward, common case: each patch packed into one int64, its factorisation found from packed
  suffix keys, patches grouped by factorisation (at most ``2**(n-1)`` groups), so every shift
  inside a group is a constant; each rotation's first n characters plus its last character make
  one int64 key, and a row sort is the transform. Rows whose keys tie where the repetitions may
  still differ, and batches too wide to pack, take the exact prefix-doubling path.
* inverse: the stable-sort permutation of the column, walked cycle by cycle (each cycle is one
  Lyndon factor), all rows in lock step.
"""

from __future__ import annotations

import numpy as np

_KEY_BITS = 63
_MAX_MASK_WIDTH = 62
"""Columns up to this length walk with a visited bitmask in one int64; longer ones row by row."""


def bwts_batch(patches: np.ndarray) -> np.ndarray:
    """BWTS of each row of ``patches``, a ``(k, n)`` array of non-negative integers (code points)."""
    patches = np.asarray(patches, dtype=np.int64)
    if patches.ndim != 2:
        raise ValueError(f"expected a (k, n) array of code points, got shape {patches.shape}")
    k, n = patches.shape
    if k == 0 or n == 0:
        return patches.copy()
    alphabet, ranks = _dense_ranks(patches)
    bits = int(alphabet.size).bit_length()
    if (n + 1) * bits <= _KEY_BITS:
        last = _bwts_packed(ranks, bits)
    else:
        last = _bwts_doubling(ranks)
    return alphabet[last - 1]


def inverse_bwts_batch(columns: np.ndarray) -> np.ndarray:
    """The unique ``(k, m)`` patches whose BWTS are the rows of ``columns`` (any integers)."""
    columns = np.asarray(columns, dtype=np.int64)
    k, m = columns.shape
    if k == 0 or m == 0:
        return columns.copy()
    if m > _MAX_MASK_WIDTH:
        return np.array([_inverse_bwts_row(row) for row in columns.tolist()], dtype=np.int64).reshape(k, m)
    # Stable sort as a plain sort of (value, position) keys: the low bits of the sorted keys are
    # the standard permutation, the high bits the sorted column (what each step emits).
    pos_bits = (m - 1).bit_length()
    low, high = int(columns.min()), int(columns.max())
    alphabet = None
    if low < 0 or high.bit_length() + pos_bits > _KEY_BITS:
        alphabet, columns = _dense_ranks(columns - low)
    flat = np.sort((columns << pos_bits) | np.arange(m), axis=1).ravel()
    pos_mask = (1 << pos_bits) - 1
    row_start = np.arange(k, dtype=np.int64) * m
    visited = np.zeros(k, dtype=np.int64)
    current = np.zeros(k, dtype=np.int64)
    cycle_start = np.zeros(k, dtype=np.int64)
    emitted = np.empty((m, k), dtype=np.int64)
    started = np.empty((m, k), dtype=np.int64)
    for step in range(m):
        visited |= np.left_shift(1, current)
        entry = flat[row_start + current]
        emitted[step] = entry >> pos_bits
        started[step] = cycle_start
        following = entry & pos_mask
        closed = ((visited >> following) & 1).astype(bool)
        if closed.any():
            free = ~visited
            lowest = np.log2((free & -free).astype(np.float64)).astype(np.int64)
            current = np.where(closed, lowest, following)
            cycle_start[closed] = step + 1
        else:
            current = following
    # Cycles come out in increasing order of their first position; the text holds them reversed.
    ended = np.empty((m, k), dtype=np.int64)
    end = np.full(k, m, dtype=np.int64)
    for step in range(m - 1, -1, -1):
        ended[step] = end
        np.copyto(end, step, where=started[step] == step)
    target = (m - started - ended + np.arange(m)[:, None]) + row_start
    out = np.empty(k * m, dtype=np.int64)
    out[target.ravel()] = emitted.ravel()
    out = out.reshape(k, m)
    return out if alphabet is None else alphabet[out - 1] + low


def _bwts_packed(ranks: np.ndarray, bits: int) -> np.ndarray:
    """Forward BWTS of dense ranks (>= 1) whose ``n + 1`` ranks fit one int64 key."""
    k, n = ranks.shape
    char_mask = (1 << bits) - 1
    packed = np.zeros(k, dtype=np.int64)
    for j in range(n):
        packed <<= bits
        packed |= ranks[:, j]
    # A factor starts where the suffix is smaller than every earlier one (zero fill = shorter first).
    field = (1 << (bits * n)) - 1
    smallest = packed.copy()
    shape = np.ones(k, dtype=np.int64)
    for j in range(1, n):
        suffix = (packed << (bits * j)) & field
        shape |= (suffix < smallest).astype(np.int64) << j
        np.minimum(smallest, suffix, out=smallest)
    order = np.argsort(shape.astype(np.uint32 if n > 16 else np.uint16), kind="stable")
    shapes = shape[order]
    cuts = (np.flatnonzero(shapes[1:] != shapes[:-1]) + 1).tolist()
    last = np.empty((k, n), dtype=np.int64)
    for lo, hi in zip([0, *cuts], [*cuts, k]):
        rows = order[lo:hi]
        starts = [j for j in range(n) if int(shapes[lo]) >> j & 1]
        keys = _rotation_keys(packed[rows], starts, n, bits)
        keys.sort(axis=1)
        longest = max(e - b for b, e in zip(starts, [*starts[1:], n]))
        # Repetitions of periods p, q that agree on p + q - 1 characters are equal (Fine–Wilf).
        if 2 * longest - 1 > n:
            prefix = keys >> bits
            tied = (prefix[:, 1:] == prefix[:, :-1]).any(axis=1)
            if tied.any():
                keys[tied] = _bwts_doubling(ranks[rows[tied]])
                keys[~tied] &= char_mask
                last[rows] = keys
                continue
        last[rows] = keys & char_mask
    return last


def _rotation_keys(packed: np.ndarray, starts: list[int], n: int, bits: int) -> np.ndarray:
    """Per position: the first n characters of its rotation's repetition, then its last character."""
    keys = np.empty((packed.size, n), dtype=np.int64)
    for b, e in zip(starts, [*starts[1:], n]):
        length = e - b
        top = ((1 << (bits * length)) - 1) << (bits * (n - length))
        factor = (packed << (bits * b)) & top
        for d in range(length):
            rotation = factor if d == 0 else ((factor << (bits * d)) | (factor >> (bits * (length - d)))) & top
            repeated, span = rotation, length
            while span < n:
                repeated = repeated | (repeated >> (bits * span))
                span *= 2
            column = keys[:, b + d]
            np.left_shift(repeated, bits, out=column)
            column |= (rotation >> (bits * (n - length))) & ((1 << bits) - 1)
    return keys


def _bwts_doubling(ranks: np.ndarray) -> np.ndarray:
    """Forward BWTS of dense ranks (>= 1) by prefix doubling: exact for any width and alphabet."""
    k, n = ranks.shape
    index = np.arange(n)
    # Suffix ranks (a zero sentinel column ends every suffix), then the Lyndon factor starts.
    with_end = np.concatenate([ranks, np.zeros((k, 1), dtype=np.int64)], axis=1)
    successor = np.broadcast_to(np.minimum(np.arange(1, n + 2), n), (k, n + 1))
    suffix = _rank_by_doubling(with_end, successor, (n + 1).bit_length())[:, :n]
    earlier = np.minimum.accumulate(suffix, axis=1)
    start = np.ones((k, n), dtype=bool)
    start[:, 1:] = suffix[:, 1:] < earlier[:, :-1]
    begin = np.maximum.accumulate(np.where(start, index, 0), axis=1)
    next_start = np.full((k, n), n)
    next_start[:, :-1] = np.where(start[:, 1:], index[1:], n)
    end = np.minimum.accumulate(next_start[:, ::-1], axis=1)[:, ::-1]
    # Within its factor each rotation continues cyclically; 2n - 1 characters decide the order.
    successor = np.where(index + 1 < end, index + 1, begin)
    previous = np.where(index > begin, index - 1, end - 1)
    omega = _rank_by_doubling(ranks, successor, (2 * n - 1).bit_length())
    last = np.take_along_axis(ranks, previous, axis=1)
    return np.take_along_axis(last, np.argsort(omega, axis=1, kind="stable"), axis=1)


def _rank_by_doubling(ranks: np.ndarray, successor: np.ndarray, rounds: int) -> np.ndarray:
    """Dense ranks, per row, of the sequences ``ranks[i], ranks[succ(i)], ...`` of ``2**rounds`` entries."""
    successor = np.ascontiguousarray(successor)
    for _ in range(rounds):
        pair = ranks * (int(ranks.max()) + 1) + np.take_along_axis(ranks, successor, axis=1)
        order = np.argsort(pair, axis=1)
        in_order = np.take_along_axis(pair, order, axis=1)
        dense = np.zeros(pair.shape, dtype=np.int64)
        np.cumsum(in_order[:, 1:] != in_order[:, :-1], axis=1, out=dense[:, 1:])
        ranks = np.empty_like(dense)
        np.put_along_axis(ranks, order, dense, axis=1)
        successor = np.take_along_axis(successor, successor, axis=1)
    return ranks


def _inverse_bwts_row(column: list[int]) -> list[int]:
    """One row of :func:`inverse_bwts_batch` in plain Python, for columns too long for a bitmask."""
    following = sorted(range(len(column)), key=column.__getitem__)
    seen = [False] * len(column)
    words: list[list[int]] = []
    for first in range(len(column)):
        word, at = [], first
        while not seen[at]:
            seen[at] = True
            at = following[at]
            word.append(column[at])
        if word:
            words.append(word)
    return [value for word in reversed(words) for value in word]


def _dense_ranks(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted distinct values and each value's 1-based rank among them."""
    top = int(values.max()) + 1
    if top <= 4 * values.size + 65536:
        present = np.zeros(top, dtype=bool)
        present[values.ravel()] = True
        rank_of = np.cumsum(present)
        return np.flatnonzero(present), rank_of[values]
    alphabet, inverse = np.unique(values, return_inverse=True)
    return alphabet, inverse.reshape(values.shape) + 1
