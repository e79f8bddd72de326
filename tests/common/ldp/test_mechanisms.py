"""The exponential mechanisms against closed-form distributions and their privacy bounds.

Expected probabilities, partitions and diameters are recomputed here independently with numpy/scipy
from the raw (uncentred) matrix, so an error in the centring, the chunking, the CDF sampler or the
partition shows up as a mismatch.
"""

import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist
from scipy.stats import beta as beta_dist
from scipy.stats import chisquare

from privtune.common.ldp import CusText, EmbeddingSpace, SanText, make_generator
from privtune.common.ldp.sampling import quantization_error

V, DIM, EPS, K = 20, 8, 1.0, 4
SAMPLES = 100_000
SIGNIFICANCE = 1e-3  # chi-square tests pass when p > this
FAMILY_ALPHA = 1e-3  # total false-alarm probability of each empirical privacy test (Bonferroni)


class ToyTokenizer:
    """Letters a, b, c, ... are tokens 0, 1, 2, ... (20 of them unless told otherwise)."""

    pad_token_id = bos_token_id = eos_token_id = 0

    def __init__(self, vocab_size=V):
        self.vocab_size = vocab_size

    def encode(self, text):
        return [ord(c) - ord("a") for c in text]

    def decode(self, ids):
        return "".join(chr(ord("a") + i) for i in ids)


@pytest.fixture(scope="module")
def matrix():
    return np.random.default_rng(7).normal(size=(V, DIM))


@pytest.fixture(scope="module")
def space(matrix):
    return EmbeddingSpace.from_matrix(torch.tensor(matrix, dtype=torch.float32), ToyTokenizer(), name="toy")


@pytest.fixture(scope="module")
def raw(matrix):
    """The float32-rounded matrix the space was built from, in float64."""
    return matrix.astype(np.float32).astype(np.float64)


def santext_expected(raw):
    logits = -EPS * cdist(raw, raw) / 2
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    return p / p.sum(axis=1, keepdims=True)


def greedy_partition(raw, k):
    """CusText's shared output sets, written out with plain loops."""
    free = list(range(len(raw)))
    cells = []
    while len(free) >= 2 * k:
        seed = free[0]
        order = sorted(free, key=lambda j: (j != seed, np.linalg.norm(raw[seed] - raw[j])))
        cells.append(order[:k])
        free = [j for j in free if j not in order[:k]]
    return cells + [free]  # the last k..2k-1 tokens form the last cell


def custext_expected(raw, k):
    p = np.zeros((len(raw), len(raw)))
    for cell in greedy_partition(raw, k):
        d = cdist(raw[cell], raw[cell])
        logits = -EPS * (d / d.max(axis=1, keepdims=True)) / 2
        probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        for row, x in enumerate(cell):
            p[x, cell] = probs[row]
    return p


def draw_counts(mechanism):
    """SAMPLES draws for every input token, as a (V, V) count matrix."""
    ids = torch.arange(V).repeat_interleave(SAMPLES)
    out = mechanism.sample(ids, make_generator(2024))
    return np.bincount((ids * V + out).numpy(), minlength=V * V).reshape(V, V)


@pytest.fixture(scope="module")
def santext(space):
    return SanText(space, EPS)


@pytest.fixture(scope="module")
def custext(space):
    return CusText(space, EPS, top_k=K)


@pytest.fixture(scope="module")
def santext_counts(santext):
    return draw_counts(santext)


@pytest.fixture(scope="module")
def custext_counts(custext):
    return draw_counts(custext)


def grid_rtol(space) -> float:
    """How far the law may move when the points are rounded to the space's grid (within ``rounding_bound``)."""
    return math.expm1(EPS * space.rounding_bound) + 1e-9


def test_santext_probabilities_match_the_closed_form(santext, raw):
    expected = santext_expected(raw)
    assert np.allclose(santext.probabilities(torch.arange(V)).numpy(), expected, rtol=grid_rtol(santext.space), atol=0)


def test_custext_partition_and_probabilities_match_the_closed_form(custext, raw):
    cells = greedy_partition(raw, K)
    assert sorted(sorted(c) for c in cells) == sorted(
        sorted(custext.members[g][custext.members[g] >= 0].tolist()) for g in range(len(custext.members))
    )
    assert all(K <= len(c) < 2 * K for c in cells)
    # normalised distances move by at most 2 rounding_bound / (a cell's largest distance, above 0.5 here)
    rtol = math.expm1(EPS * 4 * custext.space.rounding_bound) + 1e-9
    assert np.allclose(custext.probabilities(torch.arange(V)).numpy(), custext_expected(raw, K), rtol=rtol, atol=1e-300)


@pytest.mark.parametrize("which", ["santext", "custext"])
def test_empirical_frequencies_pass_chi_square(which, raw, santext_counts, custext_counts):
    counts = santext_counts if which == "santext" else custext_counts
    expected = santext_expected(raw) if which == "santext" else custext_expected(raw, K)
    for x in range(V):
        support = expected[x] > 0
        assert counts[x][~support].sum() == 0, "an output outside the mechanism's support was drawn"
        assert expected[x][support].min() * SAMPLES >= 5, "test design: every expected count must be >= 5"
        p_value = chisquare(counts[x][support], expected[x][support] * SAMPLES).pvalue
        assert p_value > SIGNIFICANCE, f"{which}: input {x} frequencies differ from the closed form (p={p_value:.2g})"


def log_ratio_bounds(counts, pairs_tested):
    """Clopper-Pearson intervals for every log p_x(y), each at level 1 - FAMILY_ALPHA / (2 * pairs_tested)."""
    a = FAMILY_ALPHA / (2 * pairs_tested)
    lo = beta_dist.ppf(a / 2, counts, SAMPLES - counts + 1)
    hi = beta_dist.ppf(1 - a / 2, counts + 1, SAMPLES - counts)
    with np.errstate(divide="ignore"):
        return np.log(np.nan_to_num(lo, nan=0.0)), np.log(hi)


def test_santext_empirical_log_ratios_respect_metric_and_pure_bounds(santext, santext_counts, raw):
    """|log P(y|x) - log P(y|x')| <= eps * d(x, x') (+ slack), and <= eps * D, up to confidence intervals."""
    pairs = V * V * V
    lo, hi = log_ratio_bounds(santext_counts, pairs)
    d = cdist(raw, raw)
    guarantee = santext.guarantee
    for x in range(V):
        for x2 in range(V):
            smallest_ratio = lo[x] - hi[x2]  # lower confidence bound of log p_x(y) - log p_x2(y), per y
            bound = EPS * d[x, x2] + guarantee.metric_slack
            assert (smallest_ratio <= bound).all(), f"metric bound violated for {x} vs {x2}"
            assert (smallest_ratio <= guarantee.token_epsilon).all()
    exact = np.log(santext_expected(raw))
    worst = max(np.max(np.abs(exact[x] - exact[x2]) - EPS * d[x, x2]) for x in range(V) for x2 in range(V))
    assert worst <= 1e-12, "the exact distribution itself violates eps * d"
    # the metric bound is not vacuous here: the closest pair uses a good part of it
    assert (
        max(np.max(np.abs(exact[x] - exact[x2])) / (EPS * d[x, x2]) for x in range(V) for x2 in range(V) if x != x2)
        > 0.5
    )


def test_custext_empirical_log_ratios_respect_eps_within_cells(custext, custext_counts, raw):
    cells = greedy_partition(raw, K)
    pairs = sum(len(c) ** 3 for c in cells)
    lo, hi = log_ratio_bounds(custext_counts, pairs)
    for cell in cells:
        for x in cell:
            for x2 in cell:
                assert (lo[x, cell] - hi[x2, cell] <= custext.guarantee.token_epsilon).all()
    with np.errstate(divide="ignore"):
        exact = np.log(custext_expected(raw, K))
    computed = max(np.max(np.abs(exact[np.ix_(c, c)][:, None, :] - exact[np.ix_(c, c)][None, :, :])) for c in cells)
    # each log-probability moves by at most 4 EPS rounding_bound when the points are rounded to the grid
    assert custext.guarantee.token_epsilon == pytest.approx(computed, abs=8 * EPS * custext.space.rounding_bound)
    assert custext.guarantee.token_epsilon <= EPS + 1e-12
    assert custext.guarantee.metric_epsilon is None and "cell" in custext.guarantee.scope


def test_santext_pure_guarantee_is_eps_times_exact_diameter(santext, raw):
    diameter = cdist(raw, raw).max()
    g = santext.guarantee
    slack = santext.space.rounding_bound
    assert 0 < slack < 1e-6
    assert diameter <= g.diameter <= diameter + 3 * slack
    assert EPS * diameter <= g.token_epsilon <= EPS * (diameter + 5 * slack) + 2 * quantization_error()
    assert g.scope == "metric" and "toy" in g.domain


def test_chunked_sampling_equals_unchunked(space, raw):
    ids = torch.tensor([3, 3, 7, 0, 19, 7, 3, 12])
    tiny_chunks = SanText(space, EPS, memory_cap_mb=1e-4)
    assert tiny_chunks.rows_per_chunk == 1
    whole = SanText(space, EPS)
    # identical bits: on the grid, distances do not depend on the shape of the matrix product
    assert torch.equal(tiny_chunks.probabilities(ids), whole.probabilities(ids))
    assert np.allclose(whole.probabilities(ids).numpy(), santext_expected(raw)[ids.numpy()], rtol=grid_rtol(space))
    small = CusText(space, EPS, top_k=K, memory_cap_mb=1e-4)
    assert torch.equal(small.probabilities(ids), CusText(space, EPS, top_k=K).probabilities(ids))


def test_every_position_is_sampled_from_its_own_token(space):
    """Outputs land back at the right positions when tokens repeat and chunks are small."""
    mechanism = SanText(space, 200.0, memory_cap_mb=1e-4)  # so sharp that each token maps to itself
    ids = torch.tensor([5, 1, 5, 9, 1, 0, 19, 5])
    assert torch.equal(mechanism.sample(ids, make_generator(1)), ids)
    custext = CusText(space, EPS, top_k=K, memory_cap_mb=1e-4)
    out = custext.sample(ids.repeat(50), make_generator(1))
    assert torch.equal(custext.cells[out], custext.cells[ids.repeat(50)])


def test_rejects_bad_parameters(space):
    from privtune.common.errors import PrivtuneError

    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(PrivtuneError):
            SanText(space, bad)
    with pytest.raises(PrivtuneError):
        CusText(space, 1.0, top_k=1)
