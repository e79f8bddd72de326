"""Symbol streams <-> token ids: the table lookup, the keyed permutation and the escape path.

A *stream* is an int64 array: entries >= 0 are symbol codes, negative entries are structure
markers (:data:`SEP_MARK` between patches, :data:`BREAK_MARK` between sequences of a batch,
:data:`INVALID_MARK` where model output held something undecodable). Codecs produce and consume
streams; only this module knows ids.

A symbol outside the table (never seen, or ranked past the capacity) is never mapped to a
neighbour as the original did: it becomes the escape id followed by its code in base 16, most
significant digit first, the last digit drawn from a separate "final digit" alphabet so the
spelling ends unambiguously.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

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
from privtune.common.ult.table import LookupTable

SEP_MARK = -2
INVALID_MARK = -3
BREAK_MARK = -4
_DROP = -5  # framing ids (pad/bos/eos): not part of the content
_DIGIT = -6  # escape digit ids, meaningful only right after an escape id
_ESCAPE = -7
_MAX_DIGITS = 15  # 60 bits: any code a codec makes, and no int64 overflow from model output


CodeCheck = Callable[[np.ndarray], np.ndarray]


class SymbolMapper:
    """Translate streams to ids and back under ``table`` and (optionally) ``key``.

    ``valid_codes`` is the codec's test of which codes it can decode: the table is checked with
    it once here, and codes spelled by escapes (the only other source) when parsed, so codecs can
    trust every code in a stream from :meth:`to_stream`.
    """

    def __init__(self, table: LookupTable, key: UltKey | None, valid_codes: CodeCheck) -> None:
        verify_key(table, key)
        config = table.config
        self.vocab_size = config.vocab_size
        self._valid_codes = valid_codes
        symbols = table.symbol_array()
        if symbols.size and not valid_codes(symbols).all():
            raise PrivtuneError(f"this {table.modality} ULT table holds symbols its codec cannot decode; rebuild it")
        ids = config.base + band_permutation(key, config)[: symbols.size]
        self._index = _CodeIndex(symbols, ids)
        # Lookup by id + 1: index 0 takes negative ids, vocab_size + 1 ids past the vocabulary,
        # vocab_size + 2 marks the break between two sequences of a batch.
        by_id = np.full(config.vocab_size + 3, INVALID_MARK, dtype=np.int64)
        by_id[ids + 1] = symbols
        by_id[SEP_ID + 1] = SEP_MARK
        by_id[[PAD_ID + 1, BOS_ID + 1, EOS_ID + 1]] = _DROP
        by_id[ESCAPE_ID + 1] = _ESCAPE
        by_id[CONTINUE_DIGIT_ID + 1 : FINAL_DIGIT_ID + DIGIT_BASE + 1] = _DIGIT
        by_id[config.vocab_size + 2] = BREAK_MARK
        self._by_id = by_id

    def to_ids(self, stream: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Ids for ``stream`` and, per stream entry, where its ids start (plus the total at the end)."""
        stream = np.asarray(stream, dtype=np.int64)
        separator = stream < 0
        if (stream[separator] != SEP_MARK).any():
            raise ValueError("a stream to encode holds only symbol codes and SEP_MARK")
        ids, found = self._index.lookup(stream)
        ids[separator] = SEP_ID
        escaped = ~found
        escaped &= ~separator
        if not escaped.any():
            return ids, np.arange(stream.size + 1, dtype=np.int64)
        lengths = np.ones(stream.size, dtype=np.int64)
        starts = np.zeros(stream.size + 1, dtype=np.int64)
        codes = stream[escaped]
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
        return out, starts

    def to_stream(self, sequences: Sequence[Sequence[int] | np.ndarray], strict: bool = False) -> np.ndarray:
        """Stream for a batch of id sequences, :data:`BREAK_MARK` between sequences.

        Pad/bos/eos are dropped. Anything undecodable (an id outside the vocabulary or the table,
        a stray digit, an escape not ending in a final digit) becomes :data:`INVALID_MARK`, or
        raises PrivtuneError when ``strict``.
        """
        arrays = [np.asarray(seq, dtype=np.int64).reshape(-1) for seq in sequences]
        lengths = np.array([a.size for a in arrays], dtype=np.int64)
        seq_starts = np.cumsum(lengths + 1) - lengths - 1
        if len(arrays) == 1:
            joined = arrays[0]
        else:
            joined = np.empty(int(lengths.sum()) + len(arrays) - 1, dtype=np.int64)
            for start, array in zip(seq_starts.tolist(), arrays):
                joined[start : start + array.size] = array
        index = np.clip(joined, -1, self.vocab_size)
        index += 1
        index[seq_starts[1:] - 1] = self.vocab_size + 2
        stream = self._by_id[index]
        framing = stream == _DROP
        keep = ~framing if framing.any() else None
        if (stream <= _DIGIT).any():
            keep = np.ones(stream.size, dtype=bool) if keep is None else keep
            self._parse_escapes(index - 1, stream, keep)
        if strict:
            self._refuse_invalid(stream if keep is None else np.where(keep, stream, 0), arrays, seq_starts)
        return stream if keep is None else stream[keep]

    @staticmethod
    def _refuse_invalid(stream: np.ndarray, arrays: list[np.ndarray], seq_starts: np.ndarray) -> None:
        bad = np.flatnonzero(stream == INVALID_MARK)
        if bad.size:
            seq = int(np.searchsorted(seq_starts, bad[0], side="right") - 1)
            offset = int(bad[0] - seq_starts[seq])
            raise PrivtuneError(
                f"token {offset} of sequence {seq} (id {int(arrays[seq][offset])}) is not a symbol of "
                "this table, or starts a broken escape sequence"
            )

    def _parse_escapes(self, ids: np.ndarray, stream: np.ndarray, keep: np.ndarray) -> None:
        """Replace each escape id by the code its digits spell (in place); digits it used are dropped."""
        is_digit = stream == _DIGIT
        stream[is_digit] = INVALID_MARK  # stray digits, unless an escape claims them below
        n = ids.size
        ids = ids.tolist()
        escapes = np.flatnonzero(stream == _ESCAPE)
        for at in escapes.tolist():
            code, j, last = 0, at + 1, min(at + _MAX_DIGITS, n - 1)
            while j < last and CONTINUE_DIGIT_ID <= ids[j] < FINAL_DIGIT_ID:
                code = code * DIGIT_BASE + ids[j] - CONTINUE_DIGIT_ID
                j += 1
            if j <= last and is_digit[j] and ids[j] >= FINAL_DIGIT_ID:
                stream[at] = code * DIGIT_BASE + ids[j] - FINAL_DIGIT_ID
                keep[at + 1 : j + 1] = False
            else:
                stream[at] = INVALID_MARK
                keep[at + 1 : j] = False
        spelled = stream[escapes]
        stream[escapes[(spelled >= 0) & ~self._valid_codes(np.maximum(spelled, 0))]] = INVALID_MARK


class _CodeIndex:
    """Hash index from codes to ids (Fibonacci hashing, linear probing, load factor <= 1/4).

    Encoding looks up millions of codes; one vectorised probe round here costs about a fifth of
    a ``searchsorted`` over the sorted table, and with this load factor few codes need a second.
    """

    _GOLDEN = np.uint64(0x9E3779B97F4A7C15)

    def __init__(self, codes: np.ndarray, ids: np.ndarray) -> None:
        bits = max(4, int(4 * codes.size).bit_length())
        self._mask = (1 << bits) - 1
        self._shift = np.uint64(64 - bits)
        self._codes = np.full(1 << bits, -1, dtype=np.int64)
        self._ids = np.zeros(1 << bits, dtype=np.int64)
        self._max_probe = 0
        for code, id_, slot in zip(codes.tolist(), ids.tolist(), self._slots(codes).tolist()):
            probe = 0
            while self._codes[(slot + probe) & self._mask] != -1:
                probe += 1
            self._codes[(slot + probe) & self._mask] = code
            self._ids[(slot + probe) & self._mask] = id_
            self._max_probe = max(self._max_probe, probe)

    def _slots(self, codes: np.ndarray) -> np.ndarray:
        return ((codes.astype(np.uint64) * self._GOLDEN) >> self._shift).astype(np.int64)

    def lookup(self, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Ids of ``codes`` and whether each was found (ids of missing codes are meaningless)."""
        slot = self._slots(codes)
        ids = self._ids[slot]
        held = self._codes[slot]
        found = held == codes
        pending = np.flatnonzero(~found & (held != -1))
        for probe in range(1, self._max_probe + 1):
            if not pending.size:
                break
            at = (slot[pending] + probe) & self._mask
            held = self._codes[at]
            hit = held == codes[pending]
            ids[pending[hit]] = self._ids[at[hit]]
            found[pending[hit]] = True
            pending = pending[~hit & (held != -1)]
        return ids, found
