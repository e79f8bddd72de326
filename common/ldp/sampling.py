"""Exact, vectorised sampling from many categorical distributions given by integer weights.

Why integers: a float64 inverse-CDF draw (a 52-bit uniform scaled by the row's total, searched in
the float cumulative sums) gives every output whose weight is below about 2^-53 of its row's total
probability exactly 0, so an output possible from one input can be impossible from another and the
per-token privacy loss is infinite. Here a row is a vector of non-negative int64 weights K with
total N < 2^62, and a draw is an integer residue uniform on [0, N) searched in the exact integer
cumulative sums: output y is drawn with probability exactly K_y / N, for every y, at any spread of
the weights (assuming the generator's 64-bit words are uniform, as any sampler must).

The residue is exact: ``torch.randint(0, 2**62)`` reduces one 64-bit generator word modulo 2^62,
which is uniform; r is kept only when r < N * floor(2^62 / N), so r mod N is uniform on [0, N)
(rejected draws are redrawn; each is rejected with probability below 1/2).

:func:`quantize` turns float weights in [0, 1] into such integers with a floor F added to every
output: K_y = floor(w_y * 2^m) + F. The floor is part of the mechanism (a mixture, in weight space,
with the uniform law); its effect on the guarantees is derived in :func:`quantization_error` and
:func:`floor_cap` and added by the mechanisms to what they print.
"""

from __future__ import annotations

import math

import torch

from privtune.common.ldp.kernels import search_rows

RANDOM_BITS = 62
TOTAL_BITS = 61  # m is chosen so that width * 2^m <= 2^61 and width * F <= 2^61: N < 2^62
FLOOR_BITS = 20
FLOOR = 1 << FLOOR_BITS
UNIT_ROUNDOFF = 2.0**-53
EXP_ROUNDING = 64 * UNIT_ROUNDOFF
"""Relative error of a computed weight exp(-a) where it can move its quantized value (see quantization_error)."""


def scale_bits(width: int) -> int:
    """m for rows of ``width`` outputs: width * (2^m + F) < 2^62, so totals and cumulative sums fit in int64."""
    m = TOTAL_BITS - max(1, math.ceil(math.log2(width)))
    if m < FLOOR_BITS + 8:
        raise ValueError(f"rows of {width} outputs are too wide for exact int64 sampling")
    return m


def quantize(weights: torch.Tensor, valid: torch.Tensor | None = None, width: int | None = None) -> torch.Tensor:
    """Integer weights floor(w * 2^m) + F for float64 ``weights`` in [0, 1]; 0 where ``valid`` is False.

    m is that of rows of ``width`` outputs (default: the last dimension of ``weights``), so weights
    computed piecemeal for rows of that width get the integers the whole row would. Consumes
    ``weights`` (scaled and floored in place).
    """
    m = scale_bits(weights.shape[-1] if width is None else width)
    out = weights.mul_(2.0**m).floor_().to(torch.long).add_(FLOOR)
    if valid is not None:
        out.masked_fill_(~valid, 0)
    return out


def quantization_error() -> float:
    """eta: every implemented probability is within exp(+-eta) of the floored design (w_y 2^m + F) / sum.

    With w the exact weights exp(-a_y) and w' the computed ones, K_y = floor(w'_y 2^m) + F differs
    from I_y = w_y 2^m + F by less than 1 + |w' - w| 2^m, and I_y >= max(F, w 2^m). The computed
    exponent and exp each round once (relative u and 1 ulp), so |w' - w| <= w (a + 2) u (1 + o(u)),
    which relative to I_y is at most min((a + 2) u, 2^m e^-a (a + 2) u / F) <= (m ln 2 + 2) u <= 64 u
    (the maximum is at e^a = 2^m / F; m <= 60). So K_y / I_y and (by summing) N / sum(I) lie in
    [1 - delta, 1 + delta] with delta = 1/F + 64 u, and K_y / N lies within exp(+-eta) of I_y / sum(I),
    eta = ln((1 + delta) / (1 - delta)).
    """
    delta = 1.0 / FLOOR + EXP_ROUNDING
    return math.log1p(delta) - math.log1p(-delta)


def floor_cap(width: int) -> float:
    """Largest log-ratio of the design (w 2^m + F) / sum between two rows of weights in [0, 1] that each hold a 1.

    Output y is most likely from a row with w_y = 1 and all else 0, (2^m + F) / (2^m + width F), and
    least likely from a row with w_y = 0 and all else 1, F / ((width - 1)(2^m + F) + F); their ratio is
    the cap. So the floor alone makes the mechanism pure LDP with this epsilon, whatever the weights.
    """
    two_m = 2.0 ** scale_bits(width)
    most = math.log(two_m + FLOOR) - math.log(two_m + width * FLOOR)
    least = math.log(FLOOR) - math.log((width - 1) * (two_m + FLOOR) + FLOOR)
    return most - least


def cumulative(integer_weights: torch.Tensor) -> torch.Tensor:
    """Row-wise cumulative sums, in place (int64, exact): what :func:`sample_rows` searches."""
    return integer_weights.cumsum_(dim=1)


def uniform_residues(totals: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One integer uniform on [0, totals[i]) per entry, exactly (rejection from 62-bit words)."""
    limits = (2**RANDOM_BITS // totals) * totals
    out = torch.randint(0, 2**RANDOM_BITS, (len(totals),), generator=generator, dtype=torch.long)
    pending = (out >= limits).nonzero().squeeze(1)
    while len(pending):
        draws = torch.randint(0, 2**RANDOM_BITS, (len(pending),), generator=generator, dtype=torch.long)
        out[pending] = draws
        pending = pending[draws >= limits[pending]]
    return out.remainder_(totals)


def columns_for(cumsum: torch.Tensor, residues: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Column y with cumsum[row, y-1] <= residue < cumsum[row, y] for each residue: exactly K_y residues map to y.

    ``cumsum`` is one row, or a matrix searched in rows[i] for residues[i].
    """
    matrix = cumsum.reshape(1, -1) if cumsum.dim() == 1 else cumsum
    rows = torch.zeros_like(residues) if rows is None else rows
    return torch.from_numpy(search_rows(matrix.contiguous().numpy(), rows.numpy(), residues.numpy()))


def sample_rows(cumsum: torch.Tensor, rows: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """For each entry r of ``rows``, a column drawn with probability exactly K[r, y] / N[r].

    ``cumsum`` is (m, k) int64 from :func:`cumulative`, every row with a positive total.
    """
    return columns_for(cumsum, uniform_residues(cumsum[rows, -1], generator), rows)


def implemented_law(cumsum: torch.Tensor) -> torch.Tensor:
    """The exact law :func:`sample_rows` draws from, K / N per row, in float64 (each entry rounded once)."""
    weights = torch.diff(cumsum, dim=1, prepend=torch.zeros_like(cumsum[:, :1]))
    return weights.to(torch.float64) / cumsum[:, -1:].to(torch.float64)
