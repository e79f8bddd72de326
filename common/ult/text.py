"""Text codec: patches -> bijective BWT -> runs ``(count, char)`` as symbol codes.

A run packs into one non-negative code ``(count - 1) << 21 | code point``: every code point
(U+0000..U+10FFFF, lone surrogates included) fits in 21 bits and is a character, none is
reserved. Patches of a
text are separated by :data:`SEP_MARK`; a patch's length is the sum of its run counts.

Decoding is total. The BWTS is a bijection on strings of each length, so every sequence of runs
is the transform of exactly one text; a code too large for a run (an escape can spell any
60-bit number) is first reduced by :meth:`TextCodec.canonical`, which leaves every code of an
encoded text unchanged; an id outside the table reads as one U+FFFD. Hence ``decode(encode(x))
== x`` for every string and every id sequence decodes to some text.

Both directions work on a whole batch at once: all patches of equal length go through
:mod:`.bwt` together (a text's last patch may be shorter; it joins the group of its length).
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from privtune.common.ult.bwt import bwts_batch, inverse_bwts_batch
from privtune.common.ult.markers import BREAK_MARK, INVALID_MARK, SEP_MARK

CODE_POINTS = 0x110000
CHAR_BITS = 21
_CHAR_MASK = (1 << CHAR_BITS) - 1
REPLACEMENT = 0xFFFD
_BLOCK_ROWS = 1 << 14
"""Patches (or stream entries) per block of passes: a block's arrays stay in cache."""


def run_code(count: int, code_point: int) -> int:
    """Symbol code of ``count`` (>= 1) repeats of ``code_point``."""
    return (count - 1) << CHAR_BITS | code_point


def run_of(code: int) -> tuple[int, int]:
    """Inverse of :func:`run_code`: ``(count, code point)``."""
    return (code >> CHAR_BITS) + 1, code & _CHAR_MASK


@dataclass(frozen=True)
class TextCodec:
    patch_size: int = 8

    def encode_batch(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """One stream for all ``texts`` and the number of stream entries of each text."""
        size = self.patch_size
        lengths = np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))
        pads = -lengths % size
        # Each text padded to whole patches (NULs, replaced below) makes the patch matrix a view.
        padded = "".join(piece for text, pad in zip(texts, pads.tolist()) for piece in (text, "\0" * pad))
        patches = np.frombuffer(padded.encode("utf-32-le", "surrogatepass"), dtype="<i4").reshape(-1, size)
        nonempty = lengths > 0
        if not nonempty.any():
            return np.empty(0, dtype=np.int32), np.zeros(len(texts), dtype=np.int64)
        n_rows = (lengths[nonempty] + pads[nonempty]) // size
        last_row = np.cumsum(n_rows) - 1
        last_len = size - pads[nonempty]
        last = bwts_batch(patches)
        # A text's shorter last patch: its own transform, then markers that join the separator's run.
        for length in np.unique(last_len[last_len < size]).tolist():
            rows = last_row[last_len == length]
            last[rows, :length] = bwts_batch(patches[rows, :length])
            last[rows, length:] = SEP_MARK
        codes, starts = _run_codes(last)
        starts[last_row, last_len] = False  # no separator after a text's last patch
        per_row = np.zeros(starts.shape[0], dtype=np.int32)
        for column in starts.T:
            per_row += column
        per_text = np.zeros(len(texts), dtype=np.int64)
        per_text[nonempty] = np.diff(np.cumsum(per_row)[last_row], prepend=0)
        return codes[starts], per_text

    def canonical(self, codes: np.ndarray) -> np.ndarray:
        """Every code >= 0 as a run of 1..patch_size characters; codes an encoding makes are unchanged."""
        return ((codes >> CHAR_BITS) % self.patch_size) << CHAR_BITS | (codes & _CHAR_MASK) % CODE_POINTS

    def decode_batch(self, stream: np.ndarray, n_texts: int) -> list[str]:
        """Texts of a stream holding ``n_texts`` texts separated by :data:`BREAK_MARK`.

        Codes must be canonical (the :class:`SymbolMapper` sees to it); :data:`INVALID_MARK`
        reads as the run of one U+FFFD.
        """
        stream = np.asarray(stream)
        if stream.dtype.kind != "i":
            stream = stream.astype(np.int64)
        markers = np.flatnonzero(stream < 0)
        kinds = stream[markers]
        is_break = kinds == BREAK_MARK
        if (n_breaks := int(is_break.sum())) != n_texts - 1:
            raise ValueError(f"stream holds {n_breaks + 1} texts, expected {n_texts}")
        if (invalid := kinds == INVALID_MARK).any():
            stream = stream.copy()
            stream[markers[invalid]] = REPLACEMENT
            markers, is_break = markers[~invalid], is_break[~invalid]
        # Slot i (a patch, maybe empty) ends at the i-th marker left (a separator or a break), the
        # last one at the stream's end; markers count zero characters.
        width = self.patch_size
        count = stream >> CHAR_BITS
        count += 1
        count[markers] = 0
        small = (stream.size + 1) * width < 2**31  # bounds the characters of canonical codes, padded
        ends = np.cumsum(count, dtype=np.int32 if small else np.int64)
        total = int(ends[-1]) if ends.size else 0
        slot_len = np.diff(ends[markers], prepend=0, append=total)
        text_last_slot = np.append(np.flatnonzero(is_break), slot_len.size - 1)
        if slot_len.max() > width:  # model output without separators: slots grouped by length
            text = _utf32(_inverse_by_length(_expand_runs(stream, count, ends, total), slot_len))
            text_end = np.cumsum(slot_len)[text_last_slot].tolist()
            return [text[a:b] for a, b in zip([0, *text_end[:-1]], text_end)]
        # Each slot padded to a whole patch (its closing marker expands to the padding) makes the
        # characters the matrix of patches, with no gathering; the padding is cut from the text.
        count[markers] = width - slot_len[:-1]
        ends = np.cumsum(count, dtype=ends.dtype)
        patches = _expand_runs(stream, count, ends, slot_len.size * width).reshape(-1, width)
        return _cut_padding(_utf32(_inverse_patches(patches, slot_len)), slot_len, text_last_slot, width)


def _expand_runs(stream: np.ndarray, count: np.ndarray, ends: np.ndarray, size: int) -> np.ndarray:
    """Each entry's code point ``count`` times (``ends``: the running total of ``count``), NULs up to ``size``.

    Block by block: ``np.repeat`` widens its counts to a fresh array, which over a whole stream
    costs more in page faults than the copy itself. A marker's "code point" is a number below 2**21.
    """
    chars = np.empty(size, dtype=np.int32)
    for lo in range(0, stream.size, _BLOCK_ROWS):
        hi = min(lo + _BLOCK_ROWS, stream.size)
        start = int(ends[lo - 1]) if lo else 0
        chars[start : int(ends[hi - 1])] = np.repeat(stream[lo:hi] & _CHAR_MASK, count[lo:hi])
    chars[int(ends[-1]) if ends.size else 0 :] = 0
    return chars


def _run_codes(last: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Codes of each row's runs, each at its run's first column, a separator after them, and where runs start.

    Rows may end in :data:`SEP_MARK` padding: it joins the separator's run. Run lengths go in by
    column passes over blocks of rows small enough to stay in cache, with no index arrays (the large
    arrays those take cost more in page faults than in work).
    """
    k, size = last.shape
    codes = np.empty((k, size + 1), dtype=np.int32 if size <= 1024 else np.int64)  # count - 1 < 2**10
    starts = np.empty(codes.shape, dtype=bool)
    for lo in range(0, k, _BLOCK_ROWS):
        _code_block(last[lo : lo + _BLOCK_ROWS], codes[lo : lo + _BLOCK_ROWS], starts[lo : lo + _BLOCK_ROWS])
    return codes, starts


def _code_block(last: np.ndarray, codes: np.ndarray, starts: np.ndarray) -> None:
    size = last.shape[1]
    codes[:, :size] = last
    codes[:, size] = SEP_MARK
    starts[:, 0] = True
    np.not_equal(codes[:, 1:], codes[:, :-1], out=starts[:, 1:])
    longer = np.zeros(last.shape[0], dtype=codes.dtype)  # (run length - 1) << CHAR_BITS from this column on
    step, zero = codes.dtype.type(1 << CHAR_BITS), codes.dtype.type(0)
    for j in range(size - 2, -1, -1):
        longer = np.where(starts[:, j + 1], zero, longer + step)
        codes[:, j] |= longer  # a marker keeps its value: its high bits are set


def _inverse_patches(patches: np.ndarray, slot_len: np.ndarray) -> np.ndarray:
    """Inverse BWTS of each row of ``patches``, of which only the first ``slot_len`` characters count;
    the rest of a row (padding) comes back as NULs."""
    width = patches.shape[1]
    out = inverse_bwts_batch(patches)
    for length in np.unique(slot_len[slot_len < width]).tolist():
        rows = np.flatnonzero(slot_len == length)
        out[rows, :length] = inverse_bwts_batch(patches[rows, :length])
        out[rows, length:] = 0
    return out


def _inverse_by_length(chars: np.ndarray, slot_len: np.ndarray) -> np.ndarray:
    """Inverse BWTS of consecutive slots of ``chars`` (lengths ``slot_len``), slots of a length together."""
    out = np.empty(chars.size, dtype=np.int32)
    char_start = np.cumsum(slot_len) - slot_len
    for length in np.unique(slot_len[slot_len > 0]).tolist():
        at = char_start[slot_len == length, None] + np.arange(length)
        out[at] = inverse_bwts_batch(chars[at])
    return out


def _utf32(code_points: np.ndarray) -> str:
    return codecs.utf_32_le_decode(np.ascontiguousarray(code_points, dtype="<i4").data, "surrogatepass", True)[0]


def _cut_padding(text: str, slot_len: np.ndarray, text_last_slot: np.ndarray, width: int) -> list[str]:
    """The texts in ``text`` (slots padded to ``width``): each the pieces between its short slots' padding."""
    cut = np.union1d(np.flatnonzero(slot_len < width), text_last_slot)  # slots a piece ends with
    start = [0, *((cut[:-1] + 1) * width).tolist()]
    stop = (cut * width + slot_len[cut]).tolist()
    pieces = np.diff(np.searchsorted(cut, text_last_slot, side="right"), prepend=0).tolist()
    texts, first = [], 0
    for n in pieces:
        texts.append("".join(text[a:b] for a, b in zip(start[first : first + n], stop[first : first + n])))
        first += n
    return texts
