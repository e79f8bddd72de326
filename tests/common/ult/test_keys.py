import os

import numpy as np
import pytest
from scipy.stats import chisquare

from privtune.common.errors import PrivtuneError
from privtune.common.ult import (
    UltConfig,
    UltKey,
    UltTokenizer,
    band_permutation,
    bind_key,
    key_from_passphrase,
    load_key_file,
    new_key_file,
    permuted_rows,
)

from .conftest import ENGLISH, KEY, OTHER_KEY, english_table


def test_key_file_round_trip_is_private_and_not_overwritten(tmp_path):
    path = tmp_path / "owner.key"
    key = new_key_file(path)
    assert (path.stat().st_mode & 0o777) == 0o600
    assert load_key_file(path) == key
    assert key.secret.hex() not in repr(key)
    with pytest.raises(PrivtuneError, match="exists"):
        new_key_file(path)
    assert new_key_file(path, overwrite=True) != key  # fresh randomness each time


@pytest.mark.parametrize("content", ["", "zz" * 32, "ab" * 31, "# only a comment\n", "ab" * 32 + "\n" + "cd" * 32])
def test_malformed_key_files_name_the_path(tmp_path, content):
    path = tmp_path / "bad.key"
    path.write_text(content)
    with pytest.raises(PrivtuneError, match="bad.key"):
        load_key_file(path)


def test_passphrase_keys_are_deterministic_and_distinct():
    assert key_from_passphrase("correct horse battery staple") == key_from_passphrase("correct horse battery staple")
    assert key_from_passphrase("correct horse battery staple") != key_from_passphrase("correct horse battery stapler")
    with pytest.raises(PrivtuneError):
        key_from_passphrase("")


def test_permutation_stays_in_bands_and_depends_on_the_key():
    config = UltConfig(vocab_size=1000, band_width=32)  # capacity 963: a partial last band
    perm = band_permutation(KEY, config)
    assert sorted(perm.tolist()) == list(range(config.capacity))
    assert np.array_equal(perm // 32, np.arange(config.capacity) // 32)
    assert np.array_equal(perm, band_permutation(KEY, config))
    assert not np.array_equal(perm, band_permutation(OTHER_KEY, config))
    assert np.array_equal(band_permutation(None, config), np.arange(config.capacity))
    assert np.array_equal(band_permutation(KEY, UltConfig(vocab_size=1000, band_width=1)), np.arange(config.capacity))


def test_permutation_is_uniform_within_a_band():
    # Over many random keys, every rank of a band lands on every slot equally often.
    config = UltConfig(vocab_size=UltConfig().base + 8, band_width=4)
    rng = np.random.default_rng(0)
    hits = np.zeros((8, 4), dtype=np.int64)
    for _ in range(4000):
        perm = band_permutation(UltKey(rng.bytes(32)), config)
        hits[np.arange(8), perm % 4] += 1
    for row in hits:
        assert chisquare(row).pvalue > 1e-4
    assert hits.sum(axis=1).tolist() == [4000] * 8


def test_permuted_rows_map_public_ids_to_keyed_ids():
    table = english_table()
    rows = permuted_rows(table, KEY)
    public, keyed = UltTokenizer(table), UltTokenizer(table, KEY)
    public_ids, keyed_ids = public.encode(ENGLISH), keyed.encode(ENGLISH)
    assert [int(rows[k]) for k in keyed_ids] == public_ids
    assert rows[: table.config.base].tolist() == list(range(table.config.base))
    assert sorted(rows.tolist()) == list(range(table.config.vocab_size))
    with pytest.raises(PrivtuneError):
        permuted_rows(bind_key(table, KEY), OTHER_KEY)


def test_key_secret_length_is_checked():
    with pytest.raises(PrivtuneError):
        UltKey(os.urandom(16))
