"""Image codec: per-patch orthonormal 2-D DCT, keep the top-left ``keep x keep`` coefficients.

Each kept coefficient, rounded to ``decimals`` decimals, is one symbol (zig-zag coded integer of
``coefficient * 10**decimals``), patch by patch in row-major order, ``keep**2`` symbols per patch,
channel after channel. Images are padded to whole patches by repeating the edge and cropped back.

Error bound (documented, tested): the orthonormal DCT preserves the L2 norm (Parseval), so for a
patch ``||x - x_hat||_2**2 = E_dropped + sum over kept (c - round(c))**2``: the energy of the
dropped coefficients plus a rounding term of at most ``keep**2 * (0.5 * 10**-decimals)**2``.
A patch whose content lies in the kept low frequencies thus comes back within
``keep * 0.5 * 10**-decimals`` (0.15 for 3x3 at one decimal) in L2.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.fft import dctn, idctn

from privtune.common.errors import PrivtuneError
from privtune.common.ult.mapping import SEP_MARK
from privtune.common.ult.numeric import unzigzag, zigzag


@dataclass(frozen=True)
class DctImageCodec:
    patch_size: int = 8
    keep: int = 3
    decimals: int = 1

    modality = "image"

    def __post_init__(self) -> None:
        if not (1 <= self.keep <= self.patch_size and 0 <= self.decimals <= 6):
            raise PrivtuneError(f"DCT codec: need 1 <= keep <= patch_size and 0 <= decimals <= 6; got {self}")

    def params(self) -> dict[str, Any]:
        return asdict(self)

    def coefficients(self, image: np.ndarray) -> np.ndarray:
        """``(channels, rows, cols, keep, keep)`` kept DCT coefficients of the padded image, unrounded."""
        planes = self._planes(image)
        c, h, w = planes.shape
        p = self.patch_size
        padded = np.pad(planes, ((0, 0), (0, -h % p), (0, -w % p)), mode="edge")
        blocks = padded.reshape(c, padded.shape[1] // p, p, padded.shape[2] // p, p).transpose(0, 1, 3, 2, 4)
        return dctn(blocks, axes=(3, 4), norm="ortho")[..., : self.keep, : self.keep]

    def encode(self, image: np.ndarray) -> np.ndarray:
        scaled = np.round(self.coefficients(image) * 10.0**self.decimals)
        return zigzag(scaled.astype(np.int64).ravel())

    def valid_codes(self, codes: np.ndarray) -> np.ndarray:
        return codes >= 0

    def decode(self, stream: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """Image of ``shape`` (as given to :meth:`encode`); missing or undecodable coefficients count as 0."""
        stream = np.asarray(stream, dtype=np.int64)
        stream = stream[stream != SEP_MARK]
        channels = 1 if len(shape) == 2 else shape[2]
        h, w = shape[0], shape[1]
        p, k = self.patch_size, self.keep
        rows, cols = -(-h // p), -(-w // p)
        wanted = channels * rows * cols * k * k
        values = np.zeros(wanted)
        usable = stream[:wanted]
        values[: usable.size] = np.where(usable >= 0, unzigzag(np.maximum(usable, 0)), 0) / 10.0**self.decimals
        coeffs = np.zeros((channels, rows, cols, p, p))
        coeffs[..., :k, :k] = values.reshape(channels, rows, cols, k, k)
        blocks = idctn(coeffs, axes=(3, 4), norm="ortho")
        planes = blocks.transpose(0, 1, 3, 2, 4).reshape(channels, rows * p, cols * p)[:, :h, :w]
        return planes[0] if len(shape) == 2 else planes.transpose(1, 2, 0)

    @staticmethod
    def _planes(image: np.ndarray) -> np.ndarray:
        image = np.asarray(image, dtype=np.float64)
        if image.ndim == 2:
            return image[None]
        if image.ndim == 3:
            return image.transpose(2, 0, 1)
        raise PrivtuneError(f"DCT codec: expected an (H, W) or (H, W, C) image, got shape {image.shape}")
