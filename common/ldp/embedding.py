"""A token embedding seen as a finite metric space: the domain and range of the LDP mechanisms.

The mechanisms perturb token ids of one tokenizer, with the Euclidean distance between rows of one
embedding matrix as the metric. This module owns everything about that space: which ids it covers
(out-of-vocabulary handling), the distances (computed in float64, with a rigorous bound on their
rounding error so that the guarantees derived from them stay honest), and a content digest that
keys the cached diameter and CusText partition.

The points lie on a power-of-two grid coarse enough that every dot product and squared distance is
an integer number of squared grid units below 2^53, so float64 computes them exactly in any
summation order: a distance is the correctly rounded square root of the exact squared distance,
the same bits whether it comes out of a matrix product of any shape or a single dot product. The
SanText samplers rely on that to compute one token's integer weights identically by different
routes (``common.ldp.envelope``). Rounding to the grid moves a distance by at most
``grid_unit * sqrt(dim)``, which :attr:`EmbeddingSpace.rounding_bound` includes, so the guarantees
also hold for the distances of the embedding as given.

Out of vocabulary means a token id the tokenizer produces that has no row in the matrix (an id at or
beyond the number of rows used). Such an id is either mapped to an explicit unknown-token row before
perturbation (``unknown_id``), so the unknown token is perturbed like any other and the original id
can never be emitted, or the text is refused. The Hugging Face loaders use the tokenizer's own
unknown token when it has a row, and refuse otherwise; byte-level BPE (SmolLM2) and the byte
tokenizer cover every input, so neither ever happens there.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch

from privtune.common.errors import PrivtuneError
from privtune.common.ldp.kernels import pair_squared_distances
from privtune.common.text_tokenizer import TextTokenizer

UNIT_ROUNDOFF = 2.0**-53  # float64
TINY_ALIAS = "tiny"
EXACT_BITS = 51  # (|x| + |y|)^2 <= 4 dim 2^(2b) grid units squared must stay within float64's 2^53
MIN_GRID_BITS = 10


def grid_unit(points: torch.Tensor) -> float:
    """The power-of-two unit on which ``points`` are rounded: coordinates become integers of at most ``b`` bits.

    b = floor((51 - log2 dim) / 2), so every partial sum of a dot product, |x|^2 + |y|^2 and
    |y|^2 - 2 x.y stay below (|x| + |y|)^2 <= 4 dim 2^(2b) <= 2^53 units squared: all exact in float64.
    """
    dim = int(points.shape[1])
    bits = int((EXACT_BITS - math.log2(dim)) // 2)
    if bits < MIN_GRID_BITS:
        raise PrivtuneError(f"embeddings of width {dim} are too wide for exact float64 distances")
    largest = float(points.abs().max())
    return 1.0 if largest == 0.0 else 2.0 ** (math.ceil(math.log2(largest)) - bits)


@dataclass(frozen=True, eq=False)
class EmbeddingSpace:
    """Rows ``0..size-1`` of an embedding matrix, centred, in float64, with the tokenizer they index.

    Centring changes no distance but makes the grid (module docstring) fine relative to the spread
    of the points. ``points`` are rounded to the grid on construction.
    """

    name: str
    points: torch.Tensor
    tokenizer: TextTokenizer
    unknown_id: int | None = None
    sq_norms: torch.Tensor = field(init=False, repr=False)
    grid_unit: float = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.points.dim() != 2 or self.points.shape[0] < 2:
            raise PrivtuneError(
                f"embedding {self.name!r} must be a matrix with at least 2 rows, got shape {tuple(self.points.shape)}"
            )
        if not torch.isfinite(self.points).all():
            raise PrivtuneError(
                f"embedding {self.name!r} contains NaN or infinite values; use a trained, finite matrix"
            )
        if self.unknown_id is not None and not 0 <= self.unknown_id < self.size:
            raise PrivtuneError(
                f"unknown_id {self.unknown_id} is not a row of embedding {self.name!r} (rows 0..{self.size - 1})"
            )
        unit = grid_unit(self.points)
        object.__setattr__(self, "grid_unit", unit)
        object.__setattr__(self, "points", torch.round(self.points.to(torch.float64) / unit).mul_(unit))
        object.__setattr__(self, "sq_norms", (self.points * self.points).sum(dim=1))

    @classmethod
    def from_matrix(
        cls, matrix: torch.Tensor, tokenizer: TextTokenizer, name: str = "given", unknown_id: int | None = None
    ) -> EmbeddingSpace:
        """Use the first ``min(rows, tokenizer.vocab_size)`` rows of ``matrix`` as the space.

        Rows beyond the tokenizer's vocabulary (padding rows of some models) are never produced by
        the tokenizer and could not be decoded, so they are neither inputs nor outputs.
        """
        used = min(int(matrix.shape[0]), int(tokenizer.vocab_size))
        points = matrix.detach()[:used].to(device="cpu", dtype=torch.float64)
        return cls(name, points - points.mean(dim=0), tokenizer, unknown_id)

    @property
    def size(self) -> int:
        return int(self.points.shape[0])

    @property
    def dim(self) -> int:
        return int(self.points.shape[1])

    @cached_property
    def digest(self) -> str:
        """SHA-256 of the centred float64 matrix on its grid: identifies the metric space for caches."""
        return hashlib.sha256(self.points.contiguous().numpy().data).hexdigest()  # no copy of the matrix

    @cached_property
    def radius(self) -> float:
        """Largest distance of a row from the centroid."""
        return float(self.sq_norms.max().sqrt())

    @cached_property
    def rounding_bound(self) -> float:
        """An upper bound on |computed distance - exact distance| for every pair of rows, grid rounding included.

        Squared distances are computed as |x|^2 + |y|^2 - 2 x.y from dot products of length ``dim``;
        each is accurate to gamma_{dim+2} (|x| + |y|)^2 <= gamma * 4 R^2 in any summation order
        (Higham, Accuracy and Stability of Numerical Algorithms, 3.1), and |sqrt(a) - sqrt(b)| <=
        sqrt(|a - b|). On the grid they are in fact exact, so this term is generous. Rounding the
        given embedding to the grid moves each point by at most unit/2 * sqrt(dim), so a distance by
        at most unit * sqrt(dim). The guarantees add this slack to every distance they use.
        """
        n_u = (self.dim + 2) * UNIT_ROUNDOFF
        gamma = n_u / (1.0 - n_u)
        return 2.0 * self.radius * math.sqrt(gamma) + self.grid_unit * math.sqrt(self.dim)

    def distances(self, rows: torch.Tensor, others: torch.Tensor | None = None) -> torch.Tensor:
        """Distances from the given rows to every row (or to ``others``), float64, exact but for the square root.

        A row's distance to itself is exactly 0 (its exact squared distance is).
        """
        columns = self.points if others is None else self.points[others]
        column_sq = self.sq_norms if others is None else self.sq_norms[others]
        sq = torch.addmm(column_sq[None, :], self.points[rows], columns.T, beta=1.0, alpha=-2.0)
        return sq.add_(self.sq_norms[rows, None]).clamp_min_(0.0).sqrt_()

    def pair_distances(self, rows: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
        """Distance from rows[i] to others[i] for each i: the same bits as the matching entry of :meth:`distances`.

        The squared distances are exact (module docstring); the square root is torch's, as in :meth:`distances`.
        """
        units, sq_units = self.grid_integers
        sq = pair_squared_distances(units, sq_units, rows.numpy(), others.numpy(), self.grid_unit**2)
        return torch.from_numpy(sq).clamp_min_(0.0).sqrt_()

    @cached_property
    def grid_integers(self) -> tuple[np.ndarray, np.ndarray]:
        """The points as int32 numbers of grid units and their squared norms in squared units (float64, exact).

        Coordinates are at most 2^25 units in magnitude (:func:`grid_unit`), so int32 holds them; a
        proposal gathers half the bytes it would from the float64 points and computes the same value.
        """
        units = torch.round(self.points / self.grid_unit)
        return units.to(torch.int32).numpy(), (units * units).sum(dim=1).numpy()

    def encode(self, text: str) -> torch.Tensor:
        """Token ids of ``text`` inside the space: out-of-vocabulary ids mapped to ``unknown_id`` or refused."""
        ids = torch.tensor(self.tokenizer.encode(text), dtype=torch.long)
        outside = (ids < 0) | (ids >= self.size)
        if bool(outside.any()):
            if self.unknown_id is None:
                position = int(outside.nonzero()[0, 0])
                raise PrivtuneError(
                    f"token id {int(ids[position])} at token position {position} has no row in embedding "
                    f"{self.name!r} ({self.size} rows); such a token would pass through unperturbed, so the text "
                    "is refused. Use an embedding that covers the tokenizer's vocabulary, or give an unknown_id row "
                    "that out-of-vocabulary tokens are mapped to before perturbation"
                )
            ids = torch.where(outside, torch.tensor(self.unknown_id), ids)
        return ids

    def decode(self, ids: torch.Tensor) -> str:
        return self.tokenizer.decode(ids.tolist())


def load_embedding(source: str = "smollm2") -> EmbeddingSpace:
    """The input embeddings and tokenizer of a model: ``smollm2``, ``tiny`` (= ``tiny-llama``), ``tiny-*`` or a folder.

    The embedding is public (the model owner's), independent of the text perturbed, which the
    guarantee requires; it need not be the model being fine-tuned.
    """
    from privtune.common.models import load_model

    loaded = load_model("tiny-llama" if source == TINY_ALIAS else source)
    matrix = loaded.model.get_input_embeddings().weight  # type: ignore[operator]  # a transformers method
    hf = getattr(loaded.tokenizer, "hf", None)
    unk = getattr(hf, "unk_token_id", None)
    unknown_id = (
        int(unk) if unk is not None and 0 <= int(unk) < min(matrix.shape[0], loaded.tokenizer.vocab_size) else None
    )
    return EmbeddingSpace.from_matrix(matrix, loaded.tokenizer, name=source, unknown_id=unknown_id)
