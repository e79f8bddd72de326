"""Straightforward ULT text encoding, one patch at a time, for the vectorised codec to be checked against.

It follows the textbook definitions with no batching or packing: Duval's Lyndon factorisation, the
rotations of all factors sorted by their infinite repetitions, runs of equal characters, then the
table's keyed id per run or its spelling on the escape path.
"""

from __future__ import annotations

from privtune.common.ult import UltKey, band_permutation
from privtune.common.ult.config import CONTINUE_DIGIT_ID, ESCAPE_ID, FINAL_DIGIT_ID, SEP_ID
from privtune.common.ult.table import LookupTable


def lyndon_factors(s: list[int]) -> list[list[int]]:
    """Duval's algorithm: s as a non-increasing sequence of Lyndon words."""
    factors, i = [], 0
    while i < len(s):
        j, k = i + 1, i
        while j < len(s) and s[k] <= s[j]:
            k = i if s[k] < s[j] else k + 1
            j += 1
        while i <= k:
            factors.append(s[i : i + j - k])
            i += j - k
    return factors


def naive_bwts(s: list[int]) -> list[int]:
    """Textbook definition: rotations of all Lyndon factors, sorted by their infinite repetition."""
    rotations = [w[d:] + w[:d] for w in lyndon_factors(s) for d in range(len(w))]
    rotations.sort(key=lambda r: (r * (2 * len(s)))[: 2 * len(s)])
    return [r[-1] for r in rotations]


def run_codes(patch: str) -> list[int]:
    """Symbol codes ``(count - 1) << 21 | code point`` of the runs of the patch's transform."""
    column = naive_bwts([ord(c) for c in patch])
    codes: list[int] = []
    start = 0
    for i in range(1, len(column) + 1):
        if i == len(column) or column[i] != column[start]:
            codes.append((i - start - 1) << 21 | column[start])
            start = i
    return codes


def reference_encode(text: str, table: LookupTable, key: UltKey | None) -> list[int]:
    """Ids of ``text``: patches' runs by table rank (keyed), unseen runs escaped in base 16, separators between."""
    size, base = table.config.patch_size, table.config.base
    perm = band_permutation(key, table.config).tolist()
    rank = {symbol: r for r, symbol in enumerate(table.symbols)}
    ids: list[int] = []
    for at in range(0, len(text), size):
        if at:
            ids.append(SEP_ID)
        for code in run_codes(text[at : at + size]):
            if code in rank:
                ids.append(base + perm[rank[code]])
                continue
            digits = f"{code:x}"
            ids.append(ESCAPE_ID)
            ids += [CONTINUE_DIGIT_ID + int(d, 16) for d in digits[:-1]] + [FINAL_DIGIT_ID + int(digits[-1], 16)]
    return ids
