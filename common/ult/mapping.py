"""Symbol streams <-> token ids: the table lookup, the keyed permutation and the escape path.

Streams (:mod:`.markers`) hold symbol codes and structure markers; only this module knows ids.

A symbol outside the table (never seen, or ranked past the capacity) is never mapped to a
neighbour: it becomes the escape id followed by its code in base 16, most significant digit
first, the last digit drawn from a separate "final digit" alphabet so the spelling ends
unambiguously.

Reading ids is total, so a model's output always decodes: pad/bos/eos and escape ids carry no
content; digits group into spellings (a group ends after a final digit, before any other id, or
after 15 digits), each spelling one code, which the codec reduces to a symbol it can decode. Only
an id outside the table (negative, past the vocabulary, or a rank no symbol holds) has no
meaning: it becomes :data:`INVALID_MARK`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numba
import numpy as np

from privtune.common.errors import PrivtuneError
from privtune.common.ult.config import (
    BOS_ID,
    CONTINUE_DIGIT_ID,
    DIGIT_BASE,
    EOS_ID,
    ESCAPE_ID,
    FINAL_DIGIT_ID,
    PAD_ID,
    SEP_ID,
)
from privtune.common.ult.keys import UltKey, band_permutation, verify_key
from privtune.common.ult.markers import BREAK_MARK, INVALID_MARK, SEP_MARK
from privtune.common.ult.table import LookupTable

_DROP = -5  # pad/bos/eos and escape ids: no content of their own
_DIGIT = -6
_MAX_DIGITS = 15  # 60 bits: any code a codec makes, and no int64 overflow from model output


Canonical = Callable[[np.ndarray], np.ndarray]


class SymbolMapper:
    """Translate streams to ids and back under ``table`` and (optionally) ``key``.

    ``canonical`` is the codec's map from any code >= 0 to one it can decode (the identity on the
    codes it produces): the table is checked against it once here, and codes spelled by digits
    (the only other source) go through it, so codecs can trust every code from :meth:`to_stream`.
    """

    def __init__(self, table: LookupTable, key: UltKey | None, canonical: Canonical) -> None:
        verify_key(table, key)
        config = table.config
        self.vocab_size = config.vocab_size
        self._canonical = canonical
        symbols = table.symbol_array()
        if symbols.size and not np.array_equal(canonical(symbols), symbols):
            raise PrivtuneError(
                f"this {table.modality} ULT table holds symbols its codec does not produce; "
                "rebuild it with 'privtune ult build-table'"
            )
        ids = config.base + band_permutation(key, config)[: symbols.size]
        self._index = _CodeIndex(np.append(symbols, SEP_MARK), np.append(ids, SEP_ID))  # separators in one pass
        # Lookup by id + 1: index 0 takes negative ids, vocab_size + 1 ids past the vocabulary.
        by_id = np.full(
            config.vocab_size + 2, INVALID_MARK, dtype=np.int32 if symbols.max(initial=0) < 2**31 else np.int64
        )
        by_id[ids + 1] = symbols
        by_id[SEP_ID + 1] = SEP_MARK
        by_id[[PAD_ID + 1, BOS_ID + 1, EOS_ID + 1, ESCAPE_ID + 1]] = _DROP
        by_id[CONTINUE_DIGIT_ID + 1 : FINAL_DIGIT_ID + DIGIT_BASE + 1] = _DIGIT
        self._by_id = by_id

    def to_ids(self, stream: np.ndarray, bounds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Ids for ``stream``, and where the ids of the entries at positions ``bounds`` (<= its size) start."""
        stream = np.asarray(stream)
        if not np.issubdtype(stream.dtype, np.signedinteger) or stream.dtype.itemsize < 4:
            stream = stream.astype(np.int64)
        ids, found = self._index.lookup(stream)
        if found.all():
            return ids, np.asarray(bounds, dtype=np.int64)
        escaped = ~found
        codes = stream[escaped].astype(np.int64)
        if codes.min() < 0:
            raise ValueError("a stream to encode holds only symbol codes and SEP_MARK")
        lengths = np.ones(stream.size, dtype=np.int64)
        starts = np.zeros(stream.size + 1, dtype=np.int64)
        if codes.max() >> (4 * _MAX_DIGITS):
            raise ValueError(f"symbol code {int(codes.max())} is too large to escape ({4 * _MAX_DIGITS} bits at most)")
        n_digits = np.ones(codes.size, dtype=np.int64)
        for place in range(1, _MAX_DIGITS):
            n_digits += (codes >> (4 * place)) > 0
        lengths[escaped] += n_digits
        np.cumsum(lengths, out=starts[1:])
        out = np.empty(int(starts[-1]), dtype=np.int64)
        out[starts[:-1][~escaped]] = ids[~escaped]
        at = starts[:-1][escaped]
        out[at] = ESCAPE_ID
        for i in range(int(n_digits.max())):
            has = n_digits > i
            shift = 4 * (n_digits[has] - 1 - i)
            digit = (codes[has] >> shift) & (DIGIT_BASE - 1)
            out[at[has] + 1 + i] = np.where(shift == 0, FINAL_DIGIT_ID, CONTINUE_DIGIT_ID) + digit
        return out, starts[bounds]

    def to_stream(self, sequences: Sequence[Sequence[int] | np.ndarray], strict: bool = False) -> np.ndarray:
        """Stream for a batch of id sequences, :data:`BREAK_MARK` between sequences.

        Ids outside the table become :data:`INVALID_MARK`, or raise PrivtuneError when ``strict``;
        every other id sequence has a stream (see the module docstring).
        """
        arrays = [np.asarray(seq).reshape(-1) for seq in sequences]
        # Signed integers pass as they are (the lookup clips them to the vocabulary in 64 bits).
        arrays = [a if a.dtype.kind == "i" else a.astype(np.int64) for a in arrays]
        lengths = np.array([a.size for a in arrays], dtype=np.int64)
        seq_starts = np.cumsum(lengths + 1) - lengths - 1
        if len(arrays) == 1:
            joined = arrays[0]
        else:
            joined = np.empty(int(lengths.sum()) + len(arrays) - 1, dtype=np.result_type(*arrays))
            for start, array in zip(seq_starts.tolist(), arrays):
                joined[start : start + array.size] = array
            joined[seq_starts[1:] - 1] = SEP_ID  # where the breaks go: an id that needs no spelling
        stream = np.empty(joined.size, dtype=self._by_id.dtype)
        special = _read_ids(joined, self._by_id, stream)
        stream[seq_starts[1:] - 1] = BREAK_MARK
        if strict:
            self._refuse_invalid(stream, arrays, seq_starts)
        if not special:  # nothing to drop or spell (markers below _DROP are _DIGIT only)
            return stream
        if (stream == _DIGIT).any():
            stream = stream.astype(np.int64)  # spelled codes may take more than 32 bits
            self._spell_digits(joined, stream)
        return stream[stream != _DROP]

    @staticmethod
    def _refuse_invalid(stream: np.ndarray, arrays: list[np.ndarray], seq_starts: np.ndarray) -> None:
        bad = np.flatnonzero(stream == INVALID_MARK)
        if bad.size:
            seq = int(np.searchsorted(seq_starts, bad[0], side="right") - 1)
            offset = int(bad[0] - seq_starts[seq])
            raise PrivtuneError(
                f"token {offset} of sequence {seq} (id {int(arrays[seq][offset])}) is not in this ULT table "
                "(outside the vocabulary, or a rank no symbol holds)"
            )

    def _spell_digits(self, ids: np.ndarray, stream: np.ndarray) -> None:
        """Replace each group of digit ids by the code it spells (in place, at the group's first digit)."""
        digit_at = np.flatnonzero(stream == _DIGIT)
        values = ids[digit_at].astype(np.int64)
        final = values >= FINAL_DIGIT_ID
        digits = np.where(final, values - FINAL_DIGIT_ID, values - CONTINUE_DIGIT_ID)
        # A run: consecutive digits, broken after a final digit; groups cut runs into 15s.
        run_start = np.ones(digit_at.size, dtype=bool)
        run_start[1:] = (digit_at[1:] != digit_at[:-1] + 1) | final[:-1]
        first_of_run = np.maximum.accumulate(np.where(run_start, np.arange(digit_at.size), 0))
        group_start = (np.arange(digit_at.size) - first_of_run) % _MAX_DIGITS == 0
        starts = np.flatnonzero(group_start)
        group = np.cumsum(group_start) - 1
        group_len = np.diff(np.append(starts, digit_at.size))
        power = 4 * (group_len[group] - 1 - (np.arange(digit_at.size) - starts[group]))
        codes = np.add.reduceat(digits << power, starts)
        stream[digit_at] = _DROP
        stream[digit_at[starts]] = self._canonical(codes)


class _CodeIndex:
    """Hash index from codes to ids (Fibonacci hashing, linear probing, load factor <= 1/4).

    Encoding looks up millions of codes: one compiled probe loop, no per-code Python.
    """

    def __init__(self, codes: np.ndarray, ids: np.ndarray) -> None:
        bits = max(4, int(4 * codes.size).bit_length())
        self._shift = 32 - bits
        self._codes = np.full(1 << bits, -1, dtype=np.int64)
        self._ids = np.zeros(1 << bits, dtype=np.int32)
        _insert(codes.astype(np.int64), ids.astype(np.int32), self._codes, self._ids, self._shift)

    def lookup(self, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Ids of ``codes`` and whether each was found (ids of missing codes are meaningless)."""
        ids = np.empty(codes.size, dtype=np.int32)
        found = np.empty(codes.size, dtype=np.bool_)
        _probe(codes, self._codes, self._ids, self._shift, ids, found)
        return ids, found


@numba.njit(cache=True, inline="always")
def _slot(code: Any, shift: int) -> int:
    """Fibonacci hash of the code's two 32-bit halves xor-ed."""
    folded = (code ^ (code >> 32)) & 0xFFFFFFFF
    return ((folded * 0x9E3779B9) & 0xFFFFFFFF) >> shift


@numba.njit(cache=True)
def _insert(codes: Any, ids: Any, held: Any, held_ids: Any, shift: int) -> None:
    mask = held.size - 1
    for i in range(codes.size):
        at = _slot(codes[i], shift)
        while held[at] != -1:
            at = (at + 1) & mask
        held[at] = codes[i]
        held_ids[at] = ids[i]


@numba.njit(cache=True)
def _probe(codes: Any, held: Any, held_ids: Any, shift: int, ids: Any, found: Any) -> None:
    mask = held.size - 1
    for i in range(codes.size):
        code = np.int64(codes[i])
        at = _slot(code, shift)
        while held[at] != code and held[at] != -1:
            at = (at + 1) & mask
        ids[i] = held_ids[at]
        found[i] = held[at] == code


@numba.njit(cache=True)
def _read_ids(joined: Any, by_id: Any, stream: Any) -> bool:
    """``stream[i]``: the entry of id ``joined[i]`` (``by_id`` is indexed by id + 1, clipped to the
    vocabulary's two ends); whether any entry needs dropping or spelling."""
    top = by_id.size - 1
    special = False
    for i in range(joined.size):
        entry = by_id[min(max(np.int64(joined[i]) + 1, 0), top)]
        stream[i] = entry
        special |= entry <= _DROP
    return special
