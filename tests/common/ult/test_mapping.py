import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from privtune.common.ult import SymbolMapper, UltConfig, build_symbol_table
from privtune.common.ult.config import CONTINUE_DIGIT_ID, ESCAPE_ID, FINAL_DIGIT_ID, SEP_ID
from privtune.common.ult.mapping import INVALID_MARK, SEP_MARK

from .conftest import KEY


def any_code(codes: np.ndarray) -> np.ndarray:
    return codes >= 0


def mapper(symbols=(7, 8, 9), key=KEY) -> SymbolMapper:
    table = build_symbol_table([np.array(symbols)], UltConfig(vocab_size=64, band_width=4), "numeric", {})
    return SymbolMapper(table, key, any_code)


def test_escape_spells_the_code_in_base_16_most_significant_first():
    ids, starts = mapper().to_ids(np.array([0x1A3, SEP_MARK, 0]))
    assert ids.tolist() == [
        ESCAPE_ID,
        CONTINUE_DIGIT_ID + 1,
        CONTINUE_DIGIT_ID + 0xA,
        FINAL_DIGIT_ID + 3,
        SEP_ID,
        ESCAPE_ID,
        FINAL_DIGIT_ID,
    ]
    assert starts.tolist() == [0, 4, 5, 7]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.integers(0, 2**60 - 1), st.sampled_from([7, 8, 9, SEP_MARK])), max_size=30))
def test_any_code_round_trips(stream):
    m = mapper()
    ids, starts = m.to_ids(np.array(stream, dtype=np.int64))
    assert starts[-1] == ids.size and all(0 <= i < 64 for i in ids.tolist())
    assert m.to_stream([ids], strict=True).tolist() == stream


def test_codes_beyond_60_bits_are_refused():
    with pytest.raises(ValueError, match="too large"):
        mapper().to_ids(np.array([2**60]))


def test_tolerant_stream_marks_what_it_cannot_read():
    m = mapper()
    broken = [ESCAPE_ID, CONTINUE_DIGIT_ID, SEP_ID, FINAL_DIGIT_ID, 63, 9999]
    assert m.to_stream([broken]).tolist() == [INVALID_MARK, SEP_MARK, INVALID_MARK, INVALID_MARK, INVALID_MARK]
