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

Both directions run as one compiled pass over all texts of a batch (:mod:`.bwt` transforms each
patch in place): per-patch work in Python or per-patch numpy calls would cost more than the
transform itself.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numba
import numpy as np

from privtune.common.ult.bwt import (
    LANE_PATCH_MAX,
    LANES,
    bwts_into,
    bwts_lanes,
    inverse_bwts_into,
    lane_scratch,
    scratch,
)
from privtune.common.ult.markers import BREAK_MARK, INVALID_MARK, SEP_MARK

CODE_POINTS = 0x110000
CHAR_BITS = 21
_CHAR_MASK = (1 << CHAR_BITS) - 1
REPLACEMENT = 0xFFFD
_INT32_COUNTS = 1 << (31 - CHAR_BITS)
"""Patches up to this size have run codes that fit int32."""


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
        joined = "".join(texts)
        # One byte per character where the texts allow it: a quarter of the memory traffic.
        chars = (
            np.frombuffer(joined.encode("latin-1"), dtype=np.uint8)
            if joined.isascii()
            else np.frombuffer(joined.encode("utf-32-le", "surrogatepass"), dtype="<i4")
        )
        lengths = np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))
        # At most one run per character and one separator per patch.
        bound = chars.size + int((-(-lengths // size)).sum())
        stream = np.empty(bound, dtype=np.int32 if size <= _INT32_COUNTS else np.int64)
        per_text = np.empty(len(texts), dtype=np.int64)
        used = _encode(chars, lengths, (0,) * size, stream, per_text)
        return stream[:used], per_text

    def canonical(self, codes: np.ndarray) -> np.ndarray:
        """Every code >= 0 as a run of 1..patch_size characters; codes an encoding makes are unchanged."""
        return ((codes >> CHAR_BITS) % self.patch_size) << CHAR_BITS | (codes & _CHAR_MASK) % CODE_POINTS

    def decode_batch(self, stream: np.ndarray, n_texts: int) -> list[str]:
        """Texts of a stream holding ``n_texts`` texts separated by :data:`BREAK_MARK`.

        Codes must be canonical (the :class:`SymbolMapper` sees to it); :data:`INVALID_MARK`
        reads as the run of one U+FFFD. A slot (the runs between two markers) is one patch of as
        many characters as its runs hold, which for a model's output may exceed the patch size.
        """
        stream = np.asarray(stream)
        if stream.dtype.kind != "i":
            stream = stream.astype(np.int64)
        n_breaks, n_chars, widest = _measure(stream)
        if n_breaks != n_texts - 1:
            raise ValueError(f"stream holds {n_breaks + 1} texts, expected {n_texts}")
        chars = np.empty(n_chars, dtype=np.int32)
        ends = np.empty(n_texts, dtype=np.int64)
        _decode(stream, (0,) * self.patch_size, widest, chars, ends)
        text = codecs.utf_32_le_decode(chars.data, "surrogatepass", True)[0]
        bounds = ends.tolist()
        return [text[a:b] for a, b in zip([0, *bounds[:-1]], bounds)]


@numba.njit(cache=True)
def _encode(chars: Any, lengths: Any, shape: tuple[int, ...], stream: Any, per_text: Any) -> int:
    """Fill ``stream`` with the runs of every patch, separators between a text's patches; its used length.

    The patch size comes as the length of ``shape``, which is part of a tuple's type: each size gets
    its own compiled kernel, in which whole patches have a constant length (unrolled loops, ~25% faster).
    A text's whole patches go through the lanes :data:`LANES` at a time where they pay off, the rest
    (and any patch the lanes decline) one by one.
    """
    size = len(shape)
    lanes = size <= LANE_PATCH_MAX
    columns = np.empty((LANES, size), dtype=np.int64)
    fits = np.zeros(LANES, dtype=np.bool_)
    lane_work, work = lane_scratch(size), scratch(size)
    at = pos = 0
    for t in range(lengths.size):
        first, stop = at, pos + lengths[t]
        while pos < stop:
            count = min(LANES, (stop - pos) // size) if lanes else 0
            if count:
                bwts_lanes(chars, pos, count, size, columns, fits, lane_work)
            for k in range(max(count, 1)):
                n = min(size, stop - pos)
                column = columns[k]
                # The constant length where the patch is whole: the compiler unrolls that copy's loops.
                if n == size:
                    if not (count and fits[k]):
                        bwts_into(chars[pos : pos + size], size, column, work)
                    at = _emit_runs(column, size, stream, at)
                else:
                    bwts_into(chars[pos : pos + n], n, column, work)
                    at = _emit_runs(column, n, stream, at)
                pos += n
                if pos < stop:
                    stream[at] = SEP_MARK
                    at += 1
        per_text[t] = at - first
    return at


@numba.njit(cache=True, inline="always")
def _emit_runs(column: Any, n: int, stream: Any, at: int) -> int:
    """The run codes of ``column[:n]`` into ``stream`` from ``at``; where they end."""
    run = 0
    for i in range(1, n + 1):
        if i == n or column[i] != column[run]:
            stream[at] = (i - run - 1) << CHAR_BITS | column[run]
            at += 1
            run = i
    return at


@numba.njit(cache=True)
def _measure(stream: Any) -> tuple[int, int, int]:
    """Breaks, characters, and the longest slot's characters of a stream (:meth:`TextCodec.decode_batch`)."""
    breaks = chars = widest = slot = 0
    for entry in stream:
        if entry >= 0 or entry == INVALID_MARK:
            count = (entry >> CHAR_BITS) + 1 if entry >= 0 else 1
            slot += count
            chars += count
        else:
            breaks += entry == BREAK_MARK
            widest = max(widest, slot)
            slot = 0
    return breaks, chars, max(widest, slot)


@numba.njit(cache=True)
def _decode(stream: Any, shape: tuple[int, ...], widest: int, chars: Any, ends: Any) -> None:
    """Each slot's runs expanded and inverted into ``chars``; ``ends``: where each text's characters end.

    The patch size is the length of ``shape`` (see :func:`_encode`): slots of a whole patch are inverted
    at a constant length.
    """
    size = len(shape)
    column = np.empty(widest, dtype=np.int64)
    work = scratch(widest)
    slot = start = text = 0
    for i in range(stream.size + 1):
        entry = stream[i] if i < stream.size else SEP_MARK
        if entry >= 0 or entry == INVALID_MARK:
            count, char = ((entry >> CHAR_BITS) + 1, entry & _CHAR_MASK) if entry >= 0 else (1, REPLACEMENT)
            for _ in range(count):
                column[slot] = char
                slot += 1
            continue
        if slot == size:
            inverse_bwts_into(column, size, chars[start : start + size], work)
        else:
            inverse_bwts_into(column, slot, chars[start : start + slot], work)
        start += slot
        slot = 0
        if entry == BREAK_MARK or i == stream.size:
            ends[text] = start
            text += 1
