"""Numeric series codec: mu-law companding quantised to ``2**precision`` levels per sign.

``x <- clip(x / max_abs, -1, 1)``, ``y = sign(x) ln(1 + mu|x|) / ln(1 + mu)``, level
``q = trunc(y * 2**precision)``; a level is a symbol (zig-zag coded to a non-negative code), so
series go through the same table, key and escape path as text. Companding spends the levels where
a signal usually is: near zero. Decoding inverts the companding at the level's value.

Error bound (documented, tested): truncation moves ``|y|`` down by less than ``d = 2**-precision``,
and ``1 + mu|x|`` scales by ``(1 + mu)**|y|``, so for ``|x| <= max_abs``
``|x - x_hat| <= (max_abs / mu + |x|) * (1 - (1 + mu)**-d)``: relative error at most
``1 - (1 + mu)**-d`` (2.1 % for mu = 255, precision 8) plus an absolute floor near zero.
Values beyond ``max_abs`` are clipped to it (their error grows by the excess).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from privtune.common.errors import PrivtuneError
from privtune.common.ult.mapping import SEP_MARK


def zigzag(values: np.ndarray) -> np.ndarray:
    """Signed integers -> non-negative codes 0, -1, 1, -2, ... -> 0, 1, 2, 3, ..."""
    values = np.asarray(values, dtype=np.int64)
    return np.where(values >= 0, 2 * values, -2 * values - 1)


def unzigzag(codes: np.ndarray) -> np.ndarray:
    codes = np.asarray(codes, dtype=np.int64)
    return np.where(codes % 2 == 0, codes // 2, -(codes + 1) // 2)


@dataclass(frozen=True)
class MuLawCodec:
    max_abs: float = 1.0
    mu: float = 255.0
    precision: int = 8

    modality = "numeric"

    def __post_init__(self) -> None:
        if not (self.max_abs > 0 and self.mu > 0 and 1 <= self.precision <= 30):
            raise PrivtuneError(f"mu-law codec: need max_abs > 0, mu > 0, 1 <= precision <= 30; got {self}")

    def params(self) -> dict[str, Any]:
        return asdict(self)

    def encode(self, series: np.ndarray) -> np.ndarray:
        """Stream of level codes for a 1-D series (NaN is refused: it has no level)."""
        x = np.asarray(series, dtype=np.float64).ravel()
        if np.isnan(x).any():
            raise PrivtuneError("mu-law codec: the series holds NaN; fill or drop missing values first")
        x = np.clip(x / self.max_abs, -1.0, 1.0)
        y = np.sign(x) * np.log1p(self.mu * np.abs(x)) / np.log1p(self.mu)
        return zigzag(np.trunc(y * 2.0**self.precision).astype(np.int64))

    def valid_codes(self, codes: np.ndarray) -> np.ndarray:
        return (codes >= 0) & (codes <= 2 ** (self.precision + 1))

    def decode(self, stream: np.ndarray) -> np.ndarray:
        """Values for a stream from :meth:`SymbolMapper.to_stream`; undecodable entries are NaN."""
        stream = np.asarray(stream, dtype=np.int64)
        stream = stream[stream != SEP_MARK]  # separators carry nothing here
        y = unzigzag(np.maximum(stream, 0)) / 2.0**self.precision
        x = np.sign(y) * np.expm1(np.abs(y) * np.log1p(self.mu)) / self.mu
        return np.where(stream >= 0, x * self.max_abs, np.nan)

    def error_bound(self, values: np.ndarray) -> np.ndarray:
        """The bound above on ``|x - decode(encode(x))|`` for each value, plus any clipped excess."""
        magnitude = np.abs(np.asarray(values, dtype=np.float64))
        x = np.minimum(magnitude, self.max_abs)
        quantisation = (self.max_abs / self.mu + x) * -np.expm1(-np.log1p(self.mu) * 2.0**-self.precision)
        return quantisation + (magnitude - x)
