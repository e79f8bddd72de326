import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from privtune.common.ult.bwt import END, bwt_batch, inverse_bwt_batch


def naive_bwt(patch: list[int]) -> list[int]:
    """Textbook definition: sort all rotations of patch + END, take the last column."""
    text = [*patch, END]
    rotations = sorted(text[i:] + text[:i] for i in range(len(text)))
    return [rotation[-1] for rotation in rotations]


def naive_inverse(column: list[int]) -> list[int] | None:
    """The original's inverse (prepend and sort n times), checked: None if no patch has this column."""
    table = [[] for _ in column]
    for _ in column:
        table = sorted([c, *row] for c, row in zip(column, table))
    candidates = [row for row in table if row[-1] == END]
    if len(candidates) != 1 or column.count(END) != 1:
        return None
    patch = candidates[0][:-1]
    return patch if naive_bwt(patch) == column else None


# Rows of one batch share a length; mixing tiny and huge alphabets in one batch exercises every
# key width (whole rotation in one int64, prefix doubling) and periodic rows exercise ties.
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
def test_bwt_matches_textbook_definition_and_inverts(patches):
    last = bwt_batch(patches)
    assert last.tolist() == [naive_bwt(row) for row in patches.tolist()]
    decoded, valid = inverse_bwt_batch(last)
    assert valid.all()
    assert np.array_equal(decoded, patches)


def test_characters_below_any_sentinel_and_top_code_point():
    patches = np.array([[10, 9, 0, 0x10FFFF, 0, 10, 10, 9]])  # \n \t NUL U+10FFFF
    decoded, valid = inverse_bwt_batch(bwt_batch(patches))
    assert valid.all() and np.array_equal(decoded, patches)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=1, max_size=9), st.integers(0, 9))
def test_inverse_flags_exactly_the_columns_that_are_no_bwt(chars, end_at):
    column = list(chars)
    column.insert(min(end_at, len(column)), END)
    decoded, valid = inverse_bwt_batch(np.array([column]))
    expected = naive_inverse(column)
    assert bool(valid[0]) == (expected is not None)
    if expected is not None:
        assert decoded[0].tolist() == expected


def test_inverse_flags_missing_or_repeated_end():
    _, valid = inverse_bwt_batch(np.array([[1, 2, 3], [END, END, 1]]))
    assert not valid.any()


def test_empty_batch():
    assert bwt_batch(np.zeros((0, 8), dtype=np.int64)).shape == (0, 9)
