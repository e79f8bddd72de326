"""Text codec: patches -> BWT with a virtual end marker -> runs ``(count, char)`` as symbol codes.

A run packs into one non-negative code ``count << 21 | (code point + 1)``: every code point
(U+0000..U+10FFFF, lone surrogates included) plus one fits in 21 bits, and the end marker is the
run ``(1, END)`` with a zero character field, so no character is ever reserved and nothing
overflows past U+10FFFF. Patches of a text are separated by :data:`SEP_MARK`.

Both directions work on a whole batch at once: all patches of equal length go through
:mod:`common.ult.bwt` together (a text's last patch may be shorter; it joins the group of its length).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from privtune.common.errors import PrivtuneError
from privtune.common.ult.bwt import END, bwt_batch, inverse_bwt_batch
from privtune.common.ult.mapping import BREAK_MARK, INVALID_MARK, SEP_MARK

CHAR_BITS = 21
_CHAR_MASK = (1 << CHAR_BITS) - 1
MAX_CODE_POINT = 0x10FFFF
REPLACEMENT = 0xFFFD


def run_code(count: int, code_point: int) -> int:
    """Symbol code of ``count`` repeats of ``code_point`` (:data:`END` for the end marker)."""
    return (count << CHAR_BITS) | (code_point + 1)


def run_of(code: int) -> tuple[int, int]:
    """Inverse of :func:`run_code`: ``(count, code point or END)``."""
    return code >> CHAR_BITS, (code & _CHAR_MASK) - 1


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
            last = bwt_batch(cps[starts[members, None] + np.arange(length)])
            new_run = np.ones(last.shape, dtype=bool)
            np.not_equal(last[:, 1:], last[:, :-1], out=new_run[:, 1:])
            flat = np.flatnonzero(new_run)
            counts = np.diff(np.append(flat, last.size))
            groups.append((members, (counts << CHAR_BITS) | (last.ravel()[flat] + 1)))
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

    def valid_codes(self, codes: np.ndarray) -> np.ndarray:
        """Which codes are runs some text encoding produces (END only ever as a run of one)."""
        count, char = codes >> CHAR_BITS, (codes & _CHAR_MASK) - 1
        ok = (codes >= 0) & (count >= 1) & (count <= self.patch_size) & (char <= MAX_CODE_POINT)
        return ok & ((char != END) | (count == 1))

    def decode_batch(self, stream: np.ndarray, n_texts: int, strict: bool = False) -> list[str]:
        """Texts of a stream holding ``n_texts`` texts separated by :data:`BREAK_MARK`.

        Entries >= 0 must pass :meth:`valid_codes` (the :class:`SymbolMapper` guarantees it).
        Tolerant (default): an undecodable patch becomes one U+FFFD and empty patches are
        skipped, so any model output decodes. ``strict``: any such flaw, or a patch of the wrong
        length, raises PrivtuneError (an exact round trip is then guaranteed).
        """
        stream = np.asarray(stream, dtype=np.int64)
        is_break = stream == BREAK_MARK
        bounds = np.flatnonzero(is_break | (stream == SEP_MARK))
        if (n_breaks := int(is_break.sum())) != n_texts - 1:
            raise ValueError(f"stream holds {n_breaks + 1} texts, expected {n_texts}")
        # Slot i (a patch, maybe empty) spans stream[slot_start[i] : slot_start[i + 1]], its closing
        # boundary included; markers count zero characters.
        slot_start = np.concatenate(([0], bounds + 1))
        text_of_slot = np.concatenate(([0], np.cumsum(is_break[bounds])))
        count = stream >> CHAR_BITS
        count[stream < 0] = 0
        slot_len = np.add.reduceat(np.append(count, 0), slot_start)
        bad_slot = np.zeros(slot_start.size, dtype=bool)
        bad_slot[np.searchsorted(bounds, np.flatnonzero(stream == INVALID_MARK))] = True
        if strict:
            self._check_layout(slot_len, bad_slot, text_of_slot, n_texts)

        # All characters of all slots in order (END included); each length group gathers its rows.
        chars = np.repeat((stream & _CHAR_MASK) - 1, count)
        char_start = np.cumsum(slot_len) - slot_len
        decoded = []
        decodable = ~bad_slot & (slot_len > 0)
        for length in np.unique(slot_len[decodable]).tolist():
            where = np.flatnonzero(decodable & (slot_len == length))
            patches, valid = inverse_bwt_batch(chars[char_start[where, None] + np.arange(length)])
            if strict and not valid.all():
                raise PrivtuneError(f"patch {int(where[~valid][0])} is not the Burrows–Wheeler transform of any text")
            bad_slot[where[~valid]] = True
            decoded.append((where[valid], patches[valid]))

        out_len = np.where(bad_slot, 1, np.maximum(slot_len - 1, 0))
        out_start = np.cumsum(out_len) - out_len
        out = np.full(int(out_len.sum()), REPLACEMENT, dtype=np.uint32)
        for where, patches in decoded:
            out[(out_start[where, None] + np.arange(patches.shape[1])).ravel()] = patches.ravel()
        text = out.tobytes().decode("utf-32-le", "surrogatepass")
        ends = np.cumsum(np.bincount(text_of_slot, weights=out_len, minlength=n_texts).astype(np.int64)).tolist()
        return [text[a:b] for a, b in zip([0, *ends[:-1]], ends)]

    def _check_layout(self, slot_len: np.ndarray, bad_slot: np.ndarray, text_of_slot: np.ndarray, n_texts: int) -> None:
        """Strict mode: every patch full-length and well-formed except each text's (shorter) last."""
        if bad_slot.any():
            raise PrivtuneError(
                f"patch {int(np.flatnonzero(bad_slot)[0])} holds a symbol that no text encoding produces"
            )
        chars = slot_len - 1
        last_of_text = np.ones(slot_len.size, dtype=bool)
        last_of_text[:-1] = text_of_slot[1:] != text_of_slot[:-1]
        slots_per_text = np.bincount(text_of_slot, minlength=n_texts)
        empty_text = (slots_per_text == 1)[text_of_slot] & (slot_len == 0)
        wrong = ~empty_text & np.where(last_of_text, (chars < 1) | (chars > self.patch_size), chars != self.patch_size)
        if wrong.any():
            first = int(np.flatnonzero(wrong)[0])
            raise PrivtuneError(
                f"patch {first} decodes to {max(int(chars[first]), 0)} characters; with patch size "
                f"{self.patch_size} every patch but a text's last has exactly that many"
            )
