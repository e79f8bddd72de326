import math

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from privtune.common.ldp.sampling import (
    FLOOR,
    RANDOM_BITS,
    columns_for,
    cumulative,
    floor_cap,
    implemented_law,
    quantization_error,
    quantize,
    sample_rows,
    scale_bits,
    uniform_residues,
)


def integer_rows(weights) -> torch.Tensor:
    return cumulative(torch.as_tensor(weights, dtype=torch.long).clone())


def test_exactly_k_residues_map_to_each_column():
    """Every residue 0..N-1 searched: column y receives exactly K_y of them, zero-weight columns none."""
    weights = torch.tensor([[0, 3, 0, 1, 7, 0, 2], [5, 0, 0, 0, 0, 0, 1], [1, 1, 1, 1, 1, 1, 1]])
    cumsum = integer_rows(weights)
    for row in range(len(weights)):
        total = int(cumsum[row, -1])
        columns = columns_for(cumsum[row], torch.arange(total))
        assert torch.equal(torch.bincount(columns, minlength=weights.shape[1]), weights[row])


def test_residues_are_uniform_below_each_total_including_totals_near_two_to_the_62():
    """Totals just above 2^61 reject almost half of the 62-bit words: residues must still be uniform."""
    totals = torch.tensor([7, (1 << 61) + 3, (1 << 62) - 1])
    generator = torch.Generator().manual_seed(4)
    draws = uniform_residues(totals.repeat_interleave(30_000), generator).view(3, -1)
    assert bool((draws >= 0).all()) and bool((draws < totals[:, None]).all())
    assert chisquare(np.bincount(draws[0].numpy(), minlength=7)).pvalue > 1e-3
    for row in (1, 2):  # the top and bottom halves of the range, and the residues mod 5, are balanced
        top = int((draws[row] >= totals[row] // 2).sum())
        assert chisquare([top, 30_000 - top]).pvalue > 1e-3
        assert chisquare(np.bincount((draws[row] % 5).numpy(), minlength=5)).pvalue > 1e-3


def test_the_random_words_cover_all_62_bits():
    """torch.randint(0, 2^62) must use 64-bit words: a 32-bit source would leave the high bits empty."""
    draws = torch.randint(0, 2**RANDOM_BITS, (4000,), generator=torch.Generator().manual_seed(9), dtype=torch.long)
    assert int(draws.max()) >= 2**61 and int(((draws >> 40) & 1).sum()) > 1500


def test_quantize_keeps_a_floor_on_every_valid_output_and_totals_fit_int64():
    width = 49_152
    weights = torch.zeros(2, width, dtype=torch.float64)
    weights[0] = 1.0
    weights[1, 0] = 1.0
    weights[1, 1] = 1e-300  # far below any float sampler's resolution
    valid = torch.ones(2, width, dtype=torch.bool)
    valid[1, -1] = False
    integer = quantize(weights, valid)
    assert int(integer[1, 1]) == FLOOR and int(integer[1, -1]) == 0
    assert int(integer[1, 0]) == (1 << scale_bits(width)) + FLOOR
    assert int(cumulative(integer)[0, -1]) < 2**RANDOM_BITS


def test_implemented_law_is_k_over_n():
    cumsum = integer_rows([[1, 0, 3]])
    assert torch.equal(implemented_law(cumsum), torch.tensor([[0.25, 0.0, 0.75]], dtype=torch.float64))


def test_floor_cap_and_quantization_error_are_what_the_extreme_rows_give():
    """The cap is attained between a row with all mass on output 0 and a row with all weight elsewhere."""
    width = 300
    peaked = torch.zeros(1, width, dtype=torch.float64)
    peaked[0, 0] = 1.0
    spread = torch.ones(1, width, dtype=torch.float64)
    spread[0, 0] = 0.0
    rows = torch.cat([quantize(peaked), quantize(spread)])
    law = implemented_law(cumulative(rows))
    worst = float((law[0].log() - law[1].log()).abs().max())
    assert worst <= floor_cap(width) + 1e-12 and worst >= floor_cap(width) - 2 * quantization_error()
    assert 0 < quantization_error() < 3.0 / FLOOR
    assert math.isfinite(floor_cap(49_152)) and floor_cap(49_152) < 30


def test_every_draw_comes_from_its_own_row_for_rare_and_frequent_rows():
    """Each row's mass sits on one column (its index mod k); rows 0 and 5 are drawn hundreds of times, the
    others once, in shuffled order."""
    m, k = 300, 7
    weights = torch.zeros(m, k, dtype=torch.long)
    weights[torch.arange(m), torch.arange(m) % k] = 5
    rows = torch.cat(
        [
            torch.arange(m),
            torch.zeros(320, dtype=torch.long),
            torch.full((65,), 5),
        ]
    )
    rows = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))]
    assert torch.equal(sample_rows(cumulative(weights), rows, torch.Generator().manual_seed(1)), rows % k)


def test_frequent_and_rare_rows_have_the_same_distribution():
    p = np.array([1, 6, 3])
    rows = torch.cat([torch.zeros(30_000, dtype=torch.long), torch.arange(1, 30_001)])
    cumsum = integer_rows(torch.tensor(p).repeat(30_001, 1))
    out = sample_rows(cumsum, rows, torch.Generator().manual_seed(2)).numpy()
    for part in (out[:30_000], out[30_000:]):
        assert chisquare(np.bincount(part, minlength=3), p / p.sum() * 30_000).pvalue > 1e-3


@pytest.mark.parametrize("scale", [1, 1 << 50])
def test_zero_weight_columns_are_never_drawn_and_frequencies_fit(scale):
    p = np.array([0, 4, 0, 2, 1, 0, 1, 0]) * scale
    cumsum = integer_rows(np.stack([p, p[::-1].copy()]))
    rows = torch.tensor([0, 1]).repeat_interleave(40_000)
    out = sample_rows(cumsum, rows, torch.Generator().manual_seed(3)).numpy()
    for r, dist in enumerate((p, p[::-1])):
        counts = np.bincount(out[rows.numpy() == r], minlength=len(p))
        assert counts[dist == 0].sum() == 0
        assert chisquare(counts[dist > 0], dist[dist > 0] / dist.sum() * 40_000).pvalue > 1e-3
