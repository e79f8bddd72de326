import numpy as np
import torch
from scipy.stats import chisquare

from common.ldp.sampling import ROWS_PER_SEARCH, sample_rows


def test_many_rows_each_draw_from_its_own_row():
    """More rows than one int64 search can hold; each row's mass sits on one column (its own index mod k)."""
    m, k = ROWS_PER_SEARCH * 2 + 5, 7
    probs = torch.zeros(m, k, dtype=torch.float64)
    probs[torch.arange(m), torch.arange(m) % k] = 1.0
    rows = torch.randint(0, m, (5000,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample_rows(probs, rows, torch.Generator().manual_seed(1)), rows % k)


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
