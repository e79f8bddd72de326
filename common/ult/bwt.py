"""Bijective Burrows–Wheeler transform (BWTS, Gil & Scott) of short patches, compiled with numba.

The BWTS needs no end marker: a patch is cut into its Lyndon factorisation ``w1 >= w2 >= ...``,
the rotations of all factors are sorted by their infinite repetitions (omega order), and the
last characters of the sorted rotations form the transform. Every string of length n is the
transform of exactly one string of length n, so :func:`inverse_bwts_batch` accepts *any* column,
which is what lets a model's output always decode.

Patches are 8–16 characters and a corpus holds millions of them: per-patch work has to be a few
hundred machine instructions, not Python calls. The forward transform of one row (:func:`bwts_into`:
:func:`bwts_by_keys`, inlined so that a caller's constant patch length unrolls its loops, and
:func:`bwts_by_comparison` where that declines) and :func:`inverse_bwts_into` work in caller-owned
scratch, so the codec's kernels (:mod:`.text`) call them patch after patch with no allocation.
Consecutive whole patches go through :func:`bwts_lanes` first, the packed-key transform run on
:data:`LANES` patches side by side, which the compiler turns into vector instructions.
:func:`bwts_batch` and :func:`inverse_bwts_batch` are the same on whole ``(k, n)`` arrays.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np

_INSERTION_RUN = 16
"""Comparison sorts insertion-sort blocks of this many positions, then merge them."""
_COUNTING_WIDTH = 64
"""Columns up to this length are sorted by counting smaller entries (n**2 comparisons, no branches)."""
LANES = 64
"""Patches transformed side by side by :func:`bwts_lanes`: enough for the compiler's vector loops,
few enough that the work arrays stay in the L1 cache."""
LANE_PATCH_MAX = 62 // 7
"""Longest patch whose ASCII characters (ranks up to 127: 7 bits each) fit :func:`bwts_lanes`' keys;
for longer patches English text would miss the lanes and pay for them twice."""


@numba.njit(cache=True, inline="always")
def _omega_less(s: Any, p: int, q: int, begin: Any, length: Any, n: int) -> bool:
    """Whether the repetition of p's rotation sorts strictly before q's.

    n characters decide: distinct rotations of one Lyndon factor (primitive, of length L <= n)
    differ within L characters; repetitions of periods a, b that agree on a + b - 1 characters
    are equal (Fine–Wilf), and two factors of one patch have a + b <= n. Equal repetitions are
    equal rotations, whose last characters are equal too, so the order among them is immaterial.
    """
    bp, ep = begin[p], begin[p] + length[p]
    bq, eq = begin[q], begin[q] + length[q]
    for _ in range(n):
        a, b = s[p], s[q]
        if a != b:
            return a < b
        p = p + 1 if p + 1 < ep else bp
        q = q + 1 if q + 1 < eq else bq
    return False


@numba.njit(cache=True, inline="always")
def _less(s: Any, p: int, q: int, begin: Any, length: Any, n: int, by_rotation: bool) -> bool:
    return _omega_less(s, p, q, begin, length, n) if by_rotation else s[p] < s[q]


@numba.njit(cache=True)
def _stable_sort(order: Any, spare: Any, n: int, s: Any, begin: Any, length: Any, by_rotation: bool) -> None:
    """Sort positions ``order[:n]`` stably by their rotations of ``s`` (factors ``begin``, ``length``) or,
    without ``by_rotation``, by their characters: insertion-sorted blocks, then bottom-up merges."""
    for lo in range(0, n, _INSERTION_RUN):
        hi = min(lo + _INSERTION_RUN, n)
        for i in range(lo + 1, hi):
            item = order[i]
            j = i
            while j > lo and _less(s, item, order[j - 1], begin, length, n, by_rotation):
                order[j] = order[j - 1]
                j -= 1
            order[j] = item
    width, in_spare = _INSERTION_RUN, False
    src, dst = order, spare
    while width < n:
        for lo in range(0, n, 2 * width):
            mid, hi = min(lo + width, n), min(lo + 2 * width, n)
            i, j = lo, mid
            for k in range(lo, hi):
                if j < hi and (i >= mid or _less(s, src[j], src[i], begin, length, n, by_rotation)):
                    dst[k] = src[j]
                    j += 1
                else:
                    dst[k] = src[i]
                    i += 1
        src, dst = dst, src
        width, in_spare = 2 * width, not in_spare
    if in_spare:
        order[:n] = spare[:n]


@numba.njit(cache=True, inline="always")
def _lyndon_factors(s: Any, n: int, size: Any) -> None:
    """Duval's algorithm: ``size[i]`` is the length of the Lyndon factor of ``s[:n]`` starting at i."""
    i = 0
    while i < n:
        j, k = i + 1, i
        while j < n and s[k] <= s[j]:
            k = i if s[k] < s[j] else k + 1
            j += 1
        while i <= k:
            size[i] = j - k
            i += j - k


@numba.njit(cache=True)
def scratch(n: int) -> tuple[Any, Any, Any, Any]:
    """Work arrays for transforms of up to n characters: a tuple, whose items cost nothing to reach
    (rows of one 2-D array would be views made anew on every call)."""
    return (
        np.empty(n, dtype=np.int64),
        np.empty(n, dtype=np.int64),
        np.empty(n, dtype=np.int64),
        np.empty(n, dtype=np.int64),
    )


@numba.njit(cache=True, inline="always")
def _bit_length(value: int) -> int:
    bits = 1
    while value >> bits:
        bits += 1
    return bits


@numba.njit(cache=True, inline="always")
def bwts_by_keys(s: Any, n: int, out: Any, rank: Any, key: Any, size: Any) -> bool:
    """BWTS of ``s[:n]`` into ``out[:n]`` (``rank``, ``key``, ``size``: int64 scratch of n+) in the
    common case, in a few passes of simple arithmetic: characters as ranks >= 1 (themselves + 1
    where n of them fit 62 bits, else their ranks in the patch), each rotation's first n ranks packed
    into one int64 key, each rotation's place found by counting the smaller keys. False (nothing
    written) when even n ranks in the patch do not fit."""
    low, high = s[0], s[0]
    for i in range(1, n):
        low, high = min(low, s[i]), max(high, s[i])
    bits = _bit_length(high + 1) if low >= 0 and high < 1 << 62 else 64
    if bits * n <= 62:
        for i in range(n):
            rank[i] = s[i] + 1
    else:
        top = 0
        for i in range(n):
            smaller = 1
            for q in range(n):
                smaller += s[q] < s[i]
            rank[i] = smaller
            top = max(top, smaller)
        bits = _bit_length(top)
        if bits * n > 62:
            return False
    full = (1 << (bits * n)) - 1
    packed = 0
    for i in range(n):
        packed = packed << bits | rank[i]
    # A Lyndon factor starts where the suffix is smaller than every earlier one (ranks >= 1, so the
    # zero fill of a shifted suffix sorts a prefix first); size[j]: the start of j's factor for now.
    smallest, start = full + 1, 0
    for j in range(n):
        suffix = (packed << (bits * j)) & full
        start = j if suffix < smallest else start
        smallest = min(smallest, suffix)
        size[j] = start
    i = 0
    while i < n:
        end = i + 1
        while end < n and size[end] == i:
            end += 1
        # The factor's repetition from its start, by doubling; each next rotation shifts in one more rank.
        span = end - i
        repeated = (packed >> (bits * (n - end)) & ((1 << (bits * span)) - 1)) << (bits * (n - span))
        while span < n:
            repeated |= repeated >> (bits * span)
            span *= 2
        at = i + n % (end - i)
        for p in range(i, end):
            key[p] = repeated
            repeated = (repeated << bits) & full | rank[at]
            at = at + 1 if at + 1 < end else i
        size[i] = end - i
        i = end
    for p in range(n):  # equal keys are equal rotations (see _omega_less): any order among them will do
        place = 0
        for q in range(n):
            place += (key[q] < key[p]) | ((key[q] == key[p]) & (q < p))
        rank[p] = place
    i = 0
    while i < n:
        end = i + size[i]
        for p in range(i, end):
            out[rank[p]] = s[p - 1] if p > i else s[end - 1]
        i = end
    return True


@numba.njit(cache=True)
def lane_scratch(n: int) -> tuple[Any, ...]:
    """Work arrays of :func:`bwts_lanes` for patches of n characters (position-major: lanes innermost)."""
    position, lane = np.empty((5, n, LANES), dtype=np.int64), np.empty((5, LANES), dtype=np.int64)
    return (
        position[0],
        position[1],
        position[2],
        position[3],
        position[4],
        lane[0],
        lane[1],
        lane[2],
        lane[3],
        lane[4],
    )


@numba.njit(cache=True, inline="always")
def bwts_lanes(s: Any, at: int, count: int, n: int, out: Any, fits: Any, work: Any) -> None:
    """BWTS of the ``count`` (<= :data:`LANES`) patches ``s[at + n*b : at + n*b + n]`` into ``out[b, :n]``
    where ``fits[b]``; ``work``: :func:`lane_scratch` for n.

    The steps of :func:`bwts_by_keys`, each a branch-free loop over the patches (the compiler's
    vector loops: eight patches an instruction where the machine has 512-bit registers), at one
    key width for all: 62 // n bits per character rank ``c + 1``. A patch holding a character
    outside ``0 <= c < 2**bits - 1`` gets ``fits[b] = False`` and nothing written: transform it
    with :func:`bwts_into`.
    """
    chars, first, last, key, rank, packed, low, high, smallest, start = work
    bits = 62 // n
    full = (1 << (bits * n)) - 1
    for i in range(n):
        for b in range(count):
            chars[i, b] = s[at + n * b + i]
    for b in range(count):
        packed[b], low[b], high[b] = 0, chars[0, b], chars[0, b]
    for i in range(n):
        for b in range(count):
            c = chars[i, b]
            packed[b] = packed[b] << bits | (c + 1)
            low[b], high[b] = min(low[b], c), max(high[b], c)
    for b in range(count):
        fits[b] = (low[b] >= 0) & (high[b] < (1 << bits) - 1)
        smallest[b], start[b] = full + 1, 0
    for j in range(n):  # Lyndon factors as in bwts_by_keys: first[j], last[j]: the bounds of j's factor
        for b in range(count):
            suffix = (packed[b] << (bits * j)) & full
            start[b] = j if suffix < smallest[b] else start[b]
            smallest[b] = min(smallest[b], suffix)
            first[j, b] = start[b]
    for b in range(count):
        start[b] = n
    for j in range(n - 1, -1, -1):
        for b in range(count):
            last[j, b] = start[b]
            start[b] = j if first[j, b] == j else start[b]
    for p in range(n):  # p's rotation of its factor, repeated by doubling to n characters
        for b in range(count):
            width, turn = bits * (last[p, b] - first[p, b]), bits * (p - first[p, b])
            mask = (1 << width) - 1
            factor = (packed[b] >> (bits * (n - last[p, b]))) & mask
            repeated = (((factor << turn) | (factor >> (width - turn))) & mask) << (bits * n - width)
            for _ in range(_bit_length(n - 1)):
                repeated |= repeated >> min(width, 63)
                width *= 2
            key[p, b] = repeated
    for p in range(n):
        for b in range(count):
            rank[p, b] = 0
        for q in range(n):
            for b in range(count):
                rank[p, b] += (key[q, b] < key[p, b]) | ((key[q, b] == key[p, b]) & (q < p))
    for p in range(n):  # the character before p in its factor, cyclically
        for b in range(count):
            before = p - 1 + (first[p, b] == p) * (last[p, b] - p)
            out[b, rank[p, b]] = chars[before, b]


@numba.njit(cache=True, inline="always")
def bwts_into(s: Any, n: int, out: Any, work: Any) -> None:
    """BWTS of any patch ``s[:n]`` into ``out[:n]``; ``work``: :func:`scratch` for n or more characters."""
    a, b, c, d = work
    if not bwts_by_keys(s, n, out, a, b, c):
        bwts_by_comparison(s, n, out, a, b, c, d)


@numba.njit(cache=True)
def bwts_by_comparison(s: Any, n: int, out: Any, order: Any, spare: Any, begin: Any, length: Any) -> None:
    """BWTS of ``s[:n]`` into ``out[:n]`` for any patch (scratch as for :func:`bwts_by_keys`): rotations
    sorted by comparing their repetitions character by character."""
    _lyndon_factors(s, n, length)
    i = 0
    while i < n:
        size = length[i]
        for p in range(i, i + size):
            begin[p] = i
            length[p] = size
        i += size
    for p in range(n):
        order[p] = p
    _stable_sort(order, spare, n, s, begin, length, True)
    for r in range(n):
        p = order[r]
        out[r] = s[p - 1] if p > begin[p] else s[p + length[p] - 1]


@numba.njit(cache=True, inline="always")
def inverse_bwts_into(column: Any, m: int, out: Any, work: Any) -> None:
    """The patch whose BWTS is ``column[:m]``, into ``out[:m]``; ``work``: :func:`scratch` for m or more characters.

    Each cycle of the standard permutation is one Lyndon factor, and the text holds the factors in
    reverse order of their first positions. Walking each cycle backwards (position j to its rank
    LF(j) in the stable sort of the column, emitting column[j]), cycles in order of their lowest
    position, emits the whole text reversed: written from the end, no bookkeeping of cycles.
    """
    rank, seen = work[0], work[1]
    if m <= _COUNTING_WIDTH:
        for p in range(m):
            place = 0
            for q in range(m):
                place += (column[q] < column[p]) | ((column[q] == column[p]) & (q < p))
            rank[p] = place
    else:
        order = work[2]
        for p in range(m):
            order[p] = p
        _stable_sort(order, work[3], m, column, order, order, False)
        for r in range(m):
            rank[order[r]] = r
    seen[:m] = 0
    at = lowest = 0
    for step in range(m):
        seen[at] = 1
        out[m - 1 - step] = column[at]
        at = rank[at]
        if seen[at] and step + 1 < m:  # the cycle closed: the next starts at the lowest unvisited position
            while seen[lowest]:
                lowest += 1
            at = lowest


@numba.njit(cache=True)
def _bwts_rows(patches: Any, out: Any) -> None:
    """Rows through the lanes at any length (so the lanes and their fallback meet every shape of patch)."""
    k, n = patches.shape
    if n == 0:
        return
    lanes, fits, work = lane_scratch(n), np.empty(LANES, dtype=np.bool_), scratch(n)
    for row in range(0, k, LANES):
        count = min(LANES, k - row)
        bwts_lanes(patches.reshape(-1), row * n, count, n, out[row : row + count], fits, lanes)
        for b in range(count):
            if not fits[b]:
                bwts_into(patches[row + b], n, out[row + b], work)


@numba.njit(cache=True)
def _inverse_rows(columns: Any, out: Any) -> None:
    work = scratch(columns.shape[1])
    for row in range(columns.shape[0]):
        inverse_bwts_into(columns[row], columns.shape[1], out[row], work)


def bwts_batch(patches: np.ndarray) -> np.ndarray:
    """BWTS of each row of ``patches``, a ``(k, n)`` integer array (code points), as int64."""
    patches = _rows(patches, "patches")
    out = np.empty_like(patches)
    _bwts_rows(patches, out)
    return out


def inverse_bwts_batch(columns: np.ndarray) -> np.ndarray:
    """The unique ``(k, m)`` patches whose BWTS are the rows of ``columns`` (an integer array), as int64."""
    columns = _rows(columns, "columns")
    out = np.empty_like(columns)
    _inverse_rows(columns, out)
    return out


def _rows(values: np.ndarray, what: str) -> np.ndarray:
    """``values`` as a C-contiguous int64 matrix: one compiled variant serves every caller."""
    values = np.asarray(values)
    if values.ndim != 2 or not np.issubdtype(values.dtype, np.integer):
        raise ValueError(f"expected a (k, n) integer array of {what}, got {values.dtype} {values.shape}")
    if values.dtype == np.uint64 and values.size and int(values.max()) >= 2**63:
        raise ValueError(f"{what} hold values of 2**63 or more, which have no int64 code")
    return np.ascontiguousarray(values, dtype=np.int64)
