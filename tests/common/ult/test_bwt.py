import itertools

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from privtune.common.ult.bwt import bwts_batch, inverse_bwts_batch

from .reference import naive_bwts

# Rows of one batch share a length; small and huge alphabets exercise both key widths (one packed
# int64 per rotation, prefix doubling), periodic rows exercise ties between repeated factors.
alphabets = st.sampled_from([2, 3, 27, 200, 0x110000])


@st.composite
def batches(draw):
    n = draw(st.integers(1, 16))
    rows = draw(
        st.lists(st.lists(st.integers(0, draw(alphabets) - 1), min_size=n, max_size=n), min_size=1, max_size=12)
    )
    period = draw(st.integers(1, n))
    base = draw(st.lists(st.integers(0, 0x10FFFF), min_size=period, max_size=period))
    rows.append([base[i % period] for i in range(n)])
    return np.array(rows, dtype=np.int64)


@settings(max_examples=300, deadline=None)
@given(batches())
def test_bwts_matches_textbook_definition_and_inverts(patches):
    last = bwts_batch(patches)
    assert last.tolist() == [naive_bwts(row) for row in patches.tolist()]
    assert np.array_equal(inverse_bwts_batch(last), patches)


def test_every_column_is_the_transform_of_exactly_one_patch():
    for n in range(1, 8):
        columns = np.array(list(itertools.product([0, 10, 9], repeat=n)), dtype=np.int64)
        patches = inverse_bwts_batch(columns)
        assert len({tuple(p) for p in patches.tolist()}) == len(columns)
        assert np.array_equal(bwts_batch(patches), columns)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 0x10FFFF), min_size=1, max_size=90), st.integers(0, 3))
def test_any_column_inverts_at_any_length(column, alphabet):
    if alphabet:
        column = [c % (alphabet + 1) for c in column]
    patch = inverse_bwts_batch(np.array([column]))
    assert naive_bwts(patch[0].tolist()) == column


def test_long_and_short_columns_in_one_call_shape():
    assert inverse_bwts_batch(np.zeros((0, 8), dtype=np.int64)).shape == (0, 8)
    assert bwts_batch(np.zeros((0, 8), dtype=np.int64)).shape == (0, 8)
    run = np.full((2, 70), 32)
    assert np.array_equal(inverse_bwts_batch(run), run)


def test_characters_that_sort_below_everything_and_the_top_code_point():
    patches = np.array([[10, 9, 0, 0x10FFFF, 0, 10, 10, 9]])  # \n \t NUL U+10FFFF
    assert np.array_equal(inverse_bwts_batch(bwts_batch(patches)), patches)


def test_lanes_and_their_one_by_one_fallback_agree_across_lane_blocks():
    # More rows than one block of lanes; rows the lanes take (small characters) mixed with rows they
    # decline (a character too wide for the key, or negative) in the same block.
    rng = np.random.default_rng(7)
    for n in (1, 5, 8, 9, 16):
        patches = rng.integers(0, 100, (150, n))
        patches[rng.random(150) < 0.2, 0] = 0x10FFFF
        patches[rng.random(150) < 0.05, -1] = -3
        assert bwts_batch(patches).tolist() == [naive_bwts(row) for row in patches.tolist()]
