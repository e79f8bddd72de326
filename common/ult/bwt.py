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
  still differ sort by a second key (the same rotation n characters further); batches too wide to
  pack take the exact prefix-doubling path.
* inverse: the stable-sort permutation of the column, walked cycle by cycle (each cycle is one
  Lyndon factor), all rows in lock step.
"""

from __future__ import annotations

import functools

import numpy as np

_KEY_BITS = 63
_MAX_MASK_WIDTH = 62
"""Columns up to this length walk with a visited bitmask in one int64; longer ones row by row."""
_SMALL_MASK_WIDTH = 16
"""Up to this length the lowest unvisited position comes from a table of all masks."""
_BLOCK_ROWS = 1 << 14
"""Rows inverted together: a block's walk stays in cache, where whole-batch arrays would be fresh pages."""


def bwts_batch(patches: np.ndarray) -> np.ndarray:
    """BWTS of each row of ``patches``, a ``(k, n)`` array of non-negative integers (code points).

    The result is an integer array (int32 when the values allow it).
    """
    patches = np.asarray(patches)
    if patches.ndim != 2 or not np.issubdtype(patches.dtype, np.integer):
        raise ValueError(f"expected a (k, n) integer array of code points, got {patches.dtype} {patches.shape}")
    k, n = patches.shape
    if k == 0 or n == 0:
        return patches.copy()
    bits = (int(patches.max()) + 1).bit_length()
    if int(patches.min()) >= 0 and (n + 1) * bits <= _KEY_BITS:
        return _bwts_packed(patches, 1, bits)  # values + 1 as ranks: no alphabet pass
    alphabet, ranks = _dense_ranks(patches.astype(np.int64))
    bits = int(alphabet.size).bit_length()
    last = _bwts_packed(ranks, 0, bits) if (n + 1) * bits <= _KEY_BITS else _bwts_doubling(ranks)
    return alphabet[last - 1]


def inverse_bwts_batch(columns: np.ndarray) -> np.ndarray:
    """The unique ``(k, m)`` patches whose BWTS are the rows of ``columns`` (an integer array)."""
    columns = np.asarray(columns)
    if columns.ndim != 2 or not np.issubdtype(columns.dtype, np.integer):
        raise ValueError(f"expected a (k, m) integer array of columns, got {columns.dtype} {columns.shape}")
    k, m = columns.shape
    if k == 0 or m == 0:
        return columns.copy()
    if m > _MAX_MASK_WIDTH:
        return np.array([_inverse_bwts_row(row) for row in columns.tolist()], dtype=np.int64).reshape(k, m)
    # Each cycle of the standard permutation is one Lyndon factor, and the text holds the factors
    # in reverse order of their first positions. Walking each cycle backwards (position j to its
    # rank LF(j) in the stable sort, emitting column[j]) emits the whole text reversed, so the
    # result is the emission read backwards: no bookkeeping of where each cycle goes.
    pos_bits = (m - 1).bit_length()
    low, high = int(columns.min()), int(columns.max())
    alphabet = None
    if low < 0 or high.bit_length() + pos_bits > _KEY_BITS:
        alphabet, columns = _dense_ranks(columns.astype(np.int64) - low)
        high = int(columns.max())
    # Narrow types where they suffice: the walk is a few passes over short vectors per step.
    keyed = columns.astype(np.int32 if high.bit_length() + pos_bits < 32 else np.int64) << pos_bits
    out = np.empty((k, m), dtype=keyed.dtype)
    for lo in range(0, k, _BLOCK_ROWS):
        _invert_block(keyed[lo : lo + _BLOCK_ROWS], pos_bits, out[lo : lo + _BLOCK_ROWS])
    return out if alphabet is None else alphabet[out - 1] + low


def _invert_block(keyed: np.ndarray, pos_bits: int, out: np.ndarray) -> None:
    """Inverse BWTS of rows of ``column << pos_bits`` into ``out``, a block small enough to stay in cache."""
    b, m = keyed.shape
    pos_mask = keyed.dtype.type((1 << pos_bits) - 1)
    rank = np.argsort(np.sort(keyed | np.arange(m, dtype=keyed.dtype), axis=1) & pos_mask, axis=1)
    flat = (keyed | rank.astype(keyed.dtype)).ravel()
    row_start = np.arange(0, b * m, m)
    visited = np.zeros(b, dtype=np.int32 if m < 32 else np.int64)
    one = visited.dtype.type(1)
    current = np.zeros(b, dtype=np.intp)
    for step in range(m):
        visited |= np.left_shift(one, current, dtype=visited.dtype)
        entry = flat[row_start + current]
        np.right_shift(entry, pos_bits, out=out[:, m - 1 - step])
        following = (entry & pos_mask).astype(np.intp)
        closed = ((visited >> following) & 1).astype(bool)
        current = np.where(closed, _lowest_free(visited, m), following) if closed.any() else following


def _lowest_free(visited: np.ndarray, m: int) -> np.ndarray:
    """Index of the lowest zero bit of each mask (of ``m`` bits, not all set)."""
    if m <= _SMALL_MASK_WIDTH:
        return _lowest_free_table(m)[visited]
    free = ~visited
    return np.bitwise_count((free & -free) - 1).astype(np.intp)


@functools.cache
def _lowest_free_table(m: int) -> np.ndarray:
    free = ~np.arange(1 << m, dtype=np.int64)
    return np.bitwise_count((free & -free) - 1).astype(np.int8)


def _bwts_packed(values: np.ndarray, offset: int, bits: int) -> np.ndarray:
    """Forward BWTS of ranks ``values + offset`` (>= 1) whose ``n + 1`` ranks fit one int64 key."""
    k, n = values.shape
    char_mask = (1 << bits) - 1
    packed = np.zeros(k, dtype=np.int64)
    for j in range(n):
        packed <<= bits
        packed |= values[:, j]
    if offset:
        packed += sum(offset << (bits * j) for j in range(n))
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
    grouped = np.empty((k, n), dtype=np.int32)  # ranks of at most 31 bits here
    for lo, hi in zip([0, *cuts], [*cuts, k]):
        rows = order[lo:hi]
        starts = [j for j in range(n) if int(shapes[lo]) >> j & 1]
        ends = [*starts[1:], n]
        keys = _rotation_keys(packed[rows], starts, n, bits)
        # Repetitions of periods p, q that agree on p + q - 1 characters are equal (Fine–Wilf):
        # below that bound n characters decide; above it a second n (the rotation n further) do.
        if 2 * max(e - b for b, e in zip(starts, ends)) - 1 <= n:
            keys.sort(axis=1)
        else:
            unsorted = keys.copy()
            keys.sort(axis=1)
            prefix = keys >> bits
            tied = np.flatnonzero((prefix[:, 1:] == prefix[:, :-1]).any(axis=1))
            if tied.size:
                further = [b + (i - b + n) % (e - b) for b, e in zip(starts, ends) for i in range(b, e)]
                first = unsorted[tied] >> bits
                order_in_row = np.lexsort((first[:, further], first), axis=1)
                keys[tied] = np.take_along_axis(unsorted[tied], order_in_row, axis=1)
        grouped[lo:hi] = keys & char_mask
    # Back to the callers' row order: one row gather (np.take beats fancy row scatter by far).
    position = np.empty(k, dtype=np.int64)
    position[order] = np.arange(k)
    last = np.take(grouped, position, axis=0)
    if offset:
        last -= offset
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
