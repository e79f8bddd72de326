import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from privtune.common.errors import PrivtuneError
from privtune.common.ult import SymbolMapper, UltConfig, build_symbol_table
from privtune.common.ult.config import BOS_ID, CONTINUE_DIGIT_ID, ESCAPE_ID, FINAL_DIGIT_ID, SEP_ID
from privtune.common.ult.markers import INVALID_MARK, SEP_MARK

from .conftest import KEY


def identity(codes: np.ndarray) -> np.ndarray:
    return codes


def mapper(symbols=(7, 8, 9), key=KEY, canonical=identity) -> SymbolMapper:
    table = build_symbol_table([np.array(symbols)], UltConfig(vocab_size=64, band_width=4), "text", {})
    return SymbolMapper(table, key, canonical)


def test_escape_spells_the_code_in_base_16_most_significant_first():
    ids, starts = mapper().to_ids(np.array([0x1A3, SEP_MARK, 0]), np.arange(4))
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
    ids, starts = m.to_ids(np.array(stream, dtype=np.int64), np.array([len(stream)]))
    assert starts[-1] == ids.size and all(0 <= i < 64 for i in ids.tolist())
    assert m.to_stream([ids], strict=True).tolist() == stream


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_separators_map_in_either_width_and_other_markers_are_refused(dtype):
    ids, _ = mapper().to_ids(np.array([7, SEP_MARK, 8], dtype=dtype), np.array([3]))
    assert ids[1] == SEP_ID
    with pytest.raises(ValueError, match="only symbol codes"):
        mapper().to_ids(np.array([7, INVALID_MARK], dtype=dtype), np.array([2]))


def test_codes_beyond_60_bits_are_refused():
    with pytest.raises(ValueError, match="too large"):
        mapper().to_ids(np.array([2**60]), np.array([1]))


def test_digits_always_spell_a_code_and_only_ids_outside_the_table_are_invalid():
    m = mapper()
    c, f = CONTINUE_DIGIT_ID, FINAL_DIGIT_ID
    ids = [ESCAPE_ID, c + 1, SEP_ID, f + 2, BOS_ID, c + 3, c + 4, f + 5, f + 6, ESCAPE_ID, 63, 9999, -1]
    # "1" cut off by the separator, "2", "345", "6"; escape and bos carry nothing.
    assert m.to_stream([ids]).tolist() == [0x1, SEP_MARK, 0x2, 0x345, 0x6, INVALID_MARK, INVALID_MARK, INVALID_MARK]
    with pytest.raises(PrivtuneError, match="token 10 of sequence 0 .id 63. is not in this ULT table"):
        m.to_stream([ids], strict=True)


def test_a_group_holds_at_most_15_digits_and_goes_through_the_codec():
    m = mapper(canonical=lambda codes: codes % 1000)
    ids = [CONTINUE_DIGIT_ID + 15] * 16
    assert m.to_stream([ids], strict=True).tolist() == [(16**15 - 1) % 1000, 15]


def test_a_table_with_symbols_its_codec_does_not_make_is_refused():
    with pytest.raises(PrivtuneError, match="rebuild it"):
        mapper(canonical=lambda codes: codes % 8)
