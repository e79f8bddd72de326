"""Text codec: patches -> bijective BWT -> runs ``(count, char)`` as symbol codes.

A run packs into one non-negative code ``(count - 1) * CODE_POINTS + code point``: every code
point (U+0000..U+10FFFF, lone surrogates included) is a character, none is reserved. Patches of a
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

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from privtune.common.ult.bwt import bwts_batch, inverse_bwts_batch
from privtune.common.ult.markers import BREAK_MARK, INVALID_MARK, SEP_MARK

CODE_POINTS = 0x110000
REPLACEMENT = 0xFFFD


def run_code(count: int, code_point: int) -> int:
    """Symbol code of ``count`` (>= 1) repeats of ``code_point``."""
    return (count - 1) * CODE_POINTS + code_point


def run_of(code: int) -> tuple[int, int]:
    """Inverse of :func:`run_code`: ``(count, code point)``."""
    return code // CODE_POINTS + 1, code % CODE_POINTS


@dataclass(frozen=True)
class TextCodec:
    patch_size: int = 8

    def encode_batch(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """One stream for all ``texts`` and the number of stream entries of each text."""
        size = self.patch_size
        lengths = np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))
        cps = np.frombuffer("".join(texts).encode("utf-32-le", "surrogatepass"), dtype=np.uint32).astype(np.int64)
        n_patches = -(-lengths // size)
        text_of_patch = np.repeat(np.arange(len(texts)), n_patches)
        index_in_text = np.arange(text_of_patch.size) - np.repeat(np.cumsum(n_patches) - n_patches, n_patches)
        starts = (np.cumsum(lengths) - lengths)[text_of_patch] + size * index_in_text
        patch_len = np.minimum(size, lengths[text_of_patch] - size * index_in_text)
        has_sep = index_in_text < n_patches[text_of_patch] - 1

        n_runs = np.zeros(text_of_patch.size, dtype=np.int64)
        groups = []
        for length in np.unique(patch_len).tolist():
            members = np.flatnonzero(patch_len == length)
            last = bwts_batch(cps[starts[members, None] + np.arange(length)])
            new_run = np.ones(last.shape, dtype=bool)
            np.not_equal(last[:, 1:], last[:, :-1], out=new_run[:, 1:])
            flat = np.flatnonzero(new_run)
            counts = np.diff(np.append(flat, last.size))
            groups.append((members, (counts - 1) * CODE_POINTS + last.ravel()[flat]))
            n_runs[members] = new_run.sum(axis=1)

        per_patch = n_runs + has_sep
        patch_start = np.cumsum(per_patch) - per_patch
        stream = np.full(int(per_patch.sum()), SEP_MARK, dtype=np.int64)
        for members, codes in groups:
            runs = n_runs[members]
            within = np.arange(codes.size) - np.repeat(np.cumsum(runs) - runs, runs)
            stream[np.repeat(patch_start[members], runs) + within] = codes
        per_text = np.bincount(text_of_patch, weights=per_patch, minlength=len(texts)).astype(np.int64)
        return stream, per_text

    def canonical(self, codes: np.ndarray) -> np.ndarray:
        """Every code >= 0 as a run of 1..patch_size characters; codes an encoding makes are unchanged."""
        return (codes // CODE_POINTS) % self.patch_size * CODE_POINTS + codes % CODE_POINTS

    def decode_batch(self, stream: np.ndarray, n_texts: int) -> list[str]:
        """Texts of a stream holding ``n_texts`` texts separated by :data:`BREAK_MARK`.

        Codes must be canonical (the :class:`SymbolMapper` sees to it); :data:`INVALID_MARK`
        reads as the run of one U+FFFD.
        """
        stream = np.asarray(stream, dtype=np.int64)
        is_break = stream == BREAK_MARK
        if (n_breaks := int(is_break.sum())) != n_texts - 1:
            raise ValueError(f"stream holds {n_breaks + 1} texts, expected {n_texts}")
        stream = np.where(stream == INVALID_MARK, REPLACEMENT, stream)
        bounds = np.flatnonzero(is_break | (stream == SEP_MARK))
        # Slot i (a patch, maybe empty) spans stream[slot_start[i] : slot_start[i + 1]], its closing
        # boundary included; markers count zero characters.
        slot_start = np.concatenate(([0], bounds + 1))
        text_of_slot = np.concatenate(([0], np.cumsum(is_break[bounds])))
        symbol = stream >= 0
        count = np.where(symbol, stream // CODE_POINTS + 1, 0)
        slot_len = np.add.reduceat(np.append(count, 0), slot_start)
        chars = np.repeat(np.where(symbol, stream % CODE_POINTS, 0), count)
        char_start = np.cumsum(slot_len) - slot_len
        out = np.empty(chars.size, dtype=np.uint32)
        for length in np.unique(slot_len[slot_len > 0]).tolist():
            where = np.flatnonzero(slot_len == length)
            at = char_start[where, None] + np.arange(length)
            out[at] = inverse_bwts_batch(chars[at])
        text = out.tobytes().decode("utf-32-le", "surrogatepass")
        ends = np.cumsum(np.bincount(text_of_slot, weights=slot_len, minlength=n_texts).astype(np.int64)).tolist()
        return [text[a:b] for a, b in zip([0, *ends[:-1]], ends)]
