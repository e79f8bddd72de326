"""Shape of the common vocabulary every ULT table maps into.

All parties of a federation must agree on this (it fixes the model's embedding size and where
each rank lands), so it is a small frozen dataclass that travels inside every table file.

Id layout, low to high: pad, bos, eos, patch separator, escape, the escape path's digit alphabet
(:data:`DIGIT_BASE` "more digits follow" ids, then as many "last digit" ids), then ranked
symbols from :attr:`UltConfig.base` up to ``vocab_size - 1``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from privtune.common.errors import PrivtuneError

PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
SEP_ID = 3
ESCAPE_ID = 4
DIGIT_BASE = 16
"""Escaped symbols are spelled in base 16: small enough to learn, 7 digits cover any text symbol."""
CONTINUE_DIGIT_ID = 5
"""Ids ``CONTINUE_DIGIT_ID + d`` spell digit d with more digits to follow."""
FINAL_DIGIT_ID = CONTINUE_DIGIT_ID + DIGIT_BASE
"""Ids ``FINAL_DIGIT_ID + d`` spell the last digit d of an escaped symbol."""
N_SPECIAL = FINAL_DIGIT_ID + DIGIT_BASE


@dataclass(frozen=True)
class UltConfig:
    """Common vocabulary size, text patch length and keyed-permutation band width."""

    vocab_size: int = 8192
    patch_size: int = 8
    band_width: int = 32

    def __post_init__(self) -> None:
        for name in ("vocab_size", "patch_size", "band_width"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise PrivtuneError(f"ULT config: {name} must be a positive integer, got {value!r}")
        if self.vocab_size <= N_SPECIAL:
            raise PrivtuneError(
                f"ULT config: vocab_size {self.vocab_size} leaves no room for symbols; "
                f"it must exceed the {N_SPECIAL} reserved ids"
            )

    @property
    def base(self) -> int:
        """Token id of rank 0: the first id after the reserved ones."""
        return N_SPECIAL

    @property
    def capacity(self) -> int:
        """How many ranked symbols fit; rarer ones take the escape path."""
        return self.vocab_size - N_SPECIAL

    def to_dict(self) -> dict[str, int]:
        return asdict(self)
