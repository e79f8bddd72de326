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
  one int64 key, and a row sort is the transform (n characters decide, see :func:`_bwts_packed`);
  batches too wide to pack take the exact prefix-doubling path.
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
"""Up to this length the inverse walk's steps come from a table of all (visited mask, position) pairs."""
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
    # uint64 would not pack into int64 keys (its products with int64 weights are floats).
    if int(patches.min()) >= 0 and (n + 1) * bits <= _KEY_BITS and patches.dtype != np.uint64:
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
    out = np.empty((k, m), dtype=np.int32 if high.bit_length() + pos_bits < 32 else np.int64)
    for lo in range(0, k, _BLOCK_ROWS):
        _invert_block(columns[lo : lo + _BLOCK_ROWS], pos_bits, out[lo : lo + _BLOCK_ROWS])
    return out if alphabet is None else alphabet[out - 1] + low


def _invert_block(columns: np.ndarray, pos_bits: int, out: np.ndarray) -> None:
    """Inverse BWTS of rows of ``columns`` into ``out`` (whose type holds ``column << pos_bits``), a
    block small enough to stay in cache."""
    b, m = columns.shape
    keyed = columns.astype(out.dtype)
    keyed <<= pos_bits
    keyed |= np.arange(m, dtype=keyed.dtype)
    # LF: each position's rank in the stable sort of its row (keys are distinct: positions break ties).
    row_start = np.arange(0, b * m, m)
    if m <= _SMALL_MASK_WIDTH:  # short rows: count the smaller keys, no sort
        rank = np.zeros((b, m), dtype=np.int8)
        for i in range(m):
            rank += keyed[:, i : i + 1] < keyed
    else:
        order = np.sort(keyed, axis=1) & keyed.dtype.type((1 << pos_bits) - 1)
        rank = np.empty((b, m), dtype=keyed.dtype)
        rank.ravel()[(row_start[:, None] + order).ravel()] = np.tile(np.arange(m, dtype=keyed.dtype), b)
    flat = (keyed & ~keyed.dtype.type((1 << pos_bits) - 1) | rank).ravel()
    if m <= _SMALL_MASK_WIDTH:
        _walk_by_table(flat, row_start, pos_bits, out)
    else:
        _walk_by_mask(flat, row_start, pos_bits, out)


def _walk_by_table(flat: np.ndarray, row_start: np.ndarray, pos_bits: int, out: np.ndarray) -> None:
    """The walk with each row's visited positions and current position packed in one integer, whose next
    value comes from a table: three passes per step fewer than :func:`_walk_by_mask`."""
    m = out.shape[1]
    table = _next_state_table(m, pos_bits)
    pos_mask = (1 << pos_bits) - 1
    state = np.full(row_start.size, 1 << pos_bits, dtype=np.int32)
    for step in range(m):
        entry = flat[row_start + (state & pos_mask)]
        np.right_shift(entry, pos_bits, out=out[:, m - 1 - step])
        state = table[(state & ~pos_mask) | (entry & pos_mask)]


@functools.cache
def _next_state_table(m: int, pos_bits: int) -> np.ndarray:
    """``visited << pos_bits | following`` -> the same for the next position: ``following`` if unvisited,
    else the lowest unvisited one (a new cycle); past the last position the walk is over."""
    visited = np.arange(1 << m, dtype=np.int64)[:, None]
    following = np.arange(1 << pos_bits, dtype=np.int64)[None, :]
    closed = (visited >> following) & 1
    following = np.minimum(np.where(closed, _lowest_free(visited), following), m - 1)
    return ((visited | 1 << following) << pos_bits | following).astype(np.int32).ravel()


def _walk_by_mask(flat: np.ndarray, row_start: np.ndarray, pos_bits: int, out: np.ndarray) -> None:
    """The walk with each row's visited positions in a bitmask (any length up to 62)."""
    m = out.shape[1]
    pos_mask = (1 << pos_bits) - 1
    visited = np.zeros(row_start.size, dtype=np.int64)
    current = np.zeros(row_start.size, dtype=np.intp)
    for step in range(m):
        visited |= np.left_shift(1, current)
        entry = flat[row_start + current]
        np.right_shift(entry, pos_bits, out=out[:, m - 1 - step])
        following = (entry & pos_mask).astype(np.intp)
        closed = ((visited >> following) & 1).astype(bool)
        current = np.where(closed, _lowest_free(visited), following) if closed.any() else following


def _lowest_free(visited: np.ndarray) -> np.ndarray:
    """Index of the lowest zero bit of each mask."""
    free = ~visited
    return np.bitwise_count((free & -free) - 1).astype(np.intp)


def _bwts_packed(values: np.ndarray, offset: int, bits: int) -> np.ndarray:
    """Forward BWTS of ranks ``values + offset`` (>= 1) whose ``n + 1`` ranks fit one int64 key."""
    k, n = values.shape
    char_mask = (1 << bits) - 1
    packed = values @ np.array([1 << (bits * (n - 1 - j)) for j in range(n)], dtype=np.int64)
    if offset:
        packed += sum(offset << (bits * j) for j in range(n))
    # A factor starts where the suffix is smaller than every earlier one (zero fill = shorter first);
    # with the characters at the top of 64 unsigned bits, shifting left is taking a suffix.
    smallest = (packed << (64 - bits * n)).view(np.uint64)
    top = smallest.copy()
    suffix = np.empty_like(top)
    is_start = np.zeros((k, 16 if n <= 16 else 64), dtype=bool)  # packed into one uint16 or uint64
    is_start[:, 0] = True
    for j in range(1, n):
        np.left_shift(top, np.uint64(bits * j), out=suffix)
        np.less(suffix, smallest, out=is_start[:, j])
        np.minimum(smallest, suffix, out=smallest)
    shape = np.packbits(is_start, axis=1, bitorder="little").view("<u2" if n <= 16 else "<u8").ravel()
    order = np.argsort(shape, kind="stable")
    shapes = shape[order]
    packed = packed[order]
    cuts = (np.flatnonzero(shapes[1:] != shapes[:-1]) + 1).tolist()
    grouped = np.empty((k, n), dtype=np.int32)  # ranks of at most 31 bits here
    for lo, hi in zip([0, *cuts], [*cuts, k]):
        starts = [j for j in range(n) if int(shapes[lo]) >> j & 1]
        ends = [*starts[1:], n]
        keys = _rotation_keys(packed[lo:hi], starts, ends, n, bits)
        # n characters decide the omega order. Distinct rotations of one factor (primitive, of
        # length L <= n) differ within L characters; repetitions of periods p, q that agree on
        # p + q - 1 characters are equal (Fine–Wilf), and two factors of a patch have p + q <= n.
        # Equal prefixes thus mean equal rotations, whose last characters are equal too.
        keys.sort(axis=1)
        keys &= char_mask
        grouped[lo:hi] = keys
    # Back to the callers' row order: one row gather (np.take beats fancy row scatter by far).
    position = np.empty(k, dtype=np.int64)
    position[order] = np.arange(k)
    last = np.take(grouped, position, axis=0)
    if offset:
        last -= offset
    return last


def _rotation_keys(packed: np.ndarray, starts: list[int], ends: list[int], n: int, bits: int) -> np.ndarray:
    """Per position: the first n characters of its rotation's repetition, then its last character."""
    keys = np.empty((packed.size, n), dtype=np.int64)
    for b, e in zip(starts, ends):
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
