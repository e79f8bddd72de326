"""Codec output is pinned: encoding equals a one-patch-at-a-time reference and, on the benchmark corpus,
a digest; decoding fixed id sequences gives texts of a pinned digest."""

import hashlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from privtune.common.corpus import shakespeare_works
from privtune.common.ult import UltConfig, UltTokenizer, bind_key, build_table

from .conftest import KEY, tokenizer
from .reference import reference_encode

CORPUS_SHA256 = "19026576ee99b1f221126417c233d127ace754edcbd048d7fda3341bd5151746"
IDS_SHA256 = "262d674943e83b0a5012707a9c7ed3e5d7ec83f6b8c8ca55578ea6151171f5b1"
"""Ids of every work under the corpus's own keyed patch-8 table, as ``bench.ult`` encodes them."""


def _sha256(parts: list[bytes]) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
        digest.update(b"|")
    return digest.hexdigest()


def test_benchmark_corpus_encodes_to_the_pinned_ids():
    texts = [doc.text for doc in shakespeare_works()]
    assert _sha256([t.encode("utf-8") for t in texts]) == CORPUS_SHA256, "the corpus changed; re-pin both digests"
    tok = UltTokenizer(bind_key(build_table(texts, UltConfig(patch_size=8)), KEY), KEY)
    encoded = tok.encode_batch(texts)
    assert _sha256([np.asarray(ids, dtype="<i4").tobytes() for ids in encoded]) == IDS_SHA256


def test_corpus_slices_match_the_reference_with_in_table_and_escaped_symbols():
    texts = [doc.text[:3000] for doc in shakespeare_works()]
    corpus_tok = UltTokenizer(bind_key(build_table(texts, UltConfig(patch_size=8)), KEY), KEY)
    # The Hamlet tables lack most of the corpus's symbols: those take the escape path.
    for tok, key in ((corpus_tok, KEY), (tokenizer(8, keyed=True), KEY), (tokenizer(5), None)):
        assert tok.encode_batch(texts) == [reference_encode(t, tok.table, key) for t in texts]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(max_size=40), max_size=6), st.sampled_from([1, 4, 8, 16]))
def test_any_texts_match_the_reference(texts, patch_size):
    tok = tokenizer(patch_size, keyed=True)
    assert tok.encode_batch(texts) == [reference_encode(t, tok.table, KEY) for t in texts]


@pytest.mark.parametrize("wide", ["", "\x7f", "é", "\U0001f600"])
def test_long_texts_whose_patches_the_lanes_take_and_decline_match_the_reference(wide):
    # Texts longer than one block of lanes; "~" is the widest character the lanes take at patch 8,
    # DEL the narrowest they decline; one wide character makes the whole batch four bytes a character.
    rng = np.random.default_rng(5)
    alphabet = np.array([*"abcdefgh ,.~\n", *wide])
    texts = ["".join(rng.choice(alphabet, size=n)) for n in (0, 7, 8, 9, 513, 1300)]
    for patch_size in (4, 8, 10):
        tok = tokenizer(patch_size, keyed=True)
        assert tok.encode_batch(texts) == [reference_encode(t, tok.table, KEY) for t in texts]


DECODED_SHA256 = "3d6fcfe3190420ca051be7805223bb83fff4e99c1ebcbc7cf4ade27902a00854"
"""Texts of fixed random id sequences (ids outside the table, digits, slots longer than a patch)."""


def test_any_id_sequences_decode_to_the_pinned_texts():
    tok = tokenizer(8, keyed=True)
    rng = np.random.default_rng(18)
    sequences = [rng.integers(-3, 560, int(n)).tolist() for n in rng.integers(0, 400, 24)]
    sequences.append([i for i in rng.integers(5, 560, 300).tolist() if i != 3])  # no separator: one long slot
    texts = tok.decode_batch(sequences)
    assert hashlib.sha256("\x00".join(texts).encode("utf-8", "surrogatepass")).hexdigest() == DECODED_SHA256
