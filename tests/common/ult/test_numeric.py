import numpy as np
import pytest

from privtune.common.ult import MuLawCodec, SymbolMapper, UltConfig, build_symbol_table
from privtune.common.ult.config import ESCAPE_ID
from privtune.common.ult.numeric import unzigzag, zigzag

from .conftest import KEY


def test_zigzag_is_a_bijection_onto_non_negative_codes():
    values = np.arange(-1000, 1001)
    codes = zigzag(values)
    assert codes.min() == 0 and sorted(codes.tolist()) == list(range(2001))
    assert np.array_equal(unzigzag(codes), values)


def test_levels_follow_the_mu_law_formula():
    codec = MuLawCodec(max_abs=2.0, mu=255.0, precision=8)
    x = np.array([0.0, 2.0, -2.0, 5.0, 0.5, -0.01])
    # Independent evaluation of the documented formula, one value at a time.
    expected = []
    for value in x:
        v = min(max(value / 2.0, -1.0), 1.0)
        y = np.sign(v) * np.log(1 + 255.0 * abs(v)) / np.log(256.0)
        expected.append(int(y * 256))
    assert unzigzag(codec.encode(x)).tolist() == expected
    assert codec.decode(codec.encode([2.0, -2.0, 0.0])).tolist() == pytest.approx([2.0, -2.0, 0.0], abs=1e-12)


@pytest.mark.parametrize("mu,precision", [(255.0, 8), (100.0, 6), (255.0, 12)])
def test_decode_error_stays_within_the_documented_bound(mu, precision):
    codec = MuLawCodec(max_abs=3.0, mu=mu, precision=precision)
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.normal(0, 1, 20000), rng.uniform(-3, 3, 20000), rng.normal(0, 0.01, 5000)])
    error = np.abs(codec.decode(codec.encode(x)) - x)
    bound = codec.error_bound(x)
    assert (error <= bound + 1e-12).all()
    assert (error / bound).max() > 0.9  # the bound is tight, not loose


def test_values_beyond_the_range_are_clipped():
    codec = MuLawCodec(max_abs=1.0)
    assert codec.decode(codec.encode([7.0, -7.0])).tolist() == pytest.approx([1.0, -1.0], abs=1e-12)


def test_series_go_through_the_same_table_key_and_escape_path():
    codec = MuLawCodec(max_abs=1.0, precision=8)
    rng = np.random.default_rng(2)
    # The table only saw small values; large ones must be escaped, and all must come back.
    table = build_symbol_table(
        [codec.encode(rng.normal(0, 0.05, 5000))], UltConfig(vocab_size=200), "numeric", codec.params()
    )
    mapper = SymbolMapper(table, KEY, codec.valid_codes)
    series = rng.uniform(-1, 1, 500)
    codes = codec.encode(series)
    ids, _ = mapper.to_ids(codes)
    assert ESCAPE_ID in ids.tolist()
    assert np.array_equal(mapper.to_stream([ids], strict=True), codes)
    assert np.array_equal(codec.decode(mapper.to_stream([ids])), codec.decode(codes))
    assert np.isnan(codec.decode(mapper.to_stream([[4000]]))).all()  # undecodable -> NaN
