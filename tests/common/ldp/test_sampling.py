import numpy as np
import torch
from scipy.stats import chisquare

from privtune.common.ldp.sampling import BATCHED_OCCURRENCES, sample_rows


def test_every_draw_comes_from_its_own_row_for_rare_and_frequent_rows():
    """Each row's mass sits on one column (its index mod k); rows 0 and 5 are drawn far more often than the
    batched search takes, the others a few times, in shuffled order."""
    m, k = 300, 7
    weights = torch.zeros(m, k, dtype=torch.float64)
    weights[torch.arange(m), torch.arange(m) % k] = 2.5
    rows = torch.cat(
        [
            torch.arange(m),
            torch.zeros(5 * BATCHED_OCCURRENCES, dtype=torch.long),
            torch.full((BATCHED_OCCURRENCES + 1,), 5),
        ]
    )
    rows = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))]
    assert torch.equal(sample_rows(weights, rows, torch.Generator().manual_seed(1)), rows % k)


def test_frequent_and_rare_rows_have_the_same_distribution():
    p = np.array([0.1, 0.6, 0.3])
    rows = torch.cat([torch.zeros(30_000, dtype=torch.long), torch.arange(1, 30_001)])
    weights = torch.tensor(p).repeat(30_001, 1)
    out = sample_rows(weights, rows, torch.Generator().manual_seed(2)).numpy()
    for part in (out[:30_000], out[30_000:]):
        assert chisquare(np.bincount(part, minlength=3), p * 30_000).pvalue > 1e-3


def test_zero_probability_columns_are_never_drawn_and_frequencies_fit():
    p = np.array([0.0, 0.5, 0.0, 0.25, 0.125, 0.0, 0.125, 0.0])
    probs = torch.tensor(np.stack([p, p[::-1].copy()]))
    rows = torch.tensor([0, 1]).repeat_interleave(40_000)
    out = sample_rows(probs, rows, torch.Generator().manual_seed(3)).numpy()
    for r, dist in enumerate((p, p[::-1])):
        counts = np.bincount(out[rows.numpy() == r], minlength=len(p))
        assert counts[dist == 0].sum() == 0
        assert chisquare(counts[dist > 0], dist[dist > 0] * 40_000).pvalue > 1e-3


def test_unnormalised_rows_are_normalised():
    probs = torch.tensor([[3.0, 1.0]], dtype=torch.float64)
    out = sample_rows(probs, torch.zeros(40_000, dtype=torch.long), torch.Generator().manual_seed(5))
    assert chisquare(np.bincount(out.numpy(), minlength=2), [30_000, 10_000]).pvalue > 1e-3
