import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from privtune.common.errors import PrivtuneError, WrongKeyError
from privtune.common.ult import UltConfig, UltTokenizer, bind_key, build_table
from privtune.common.ult.config import (
    BOS_ID,
    CONTINUE_DIGIT_ID,
    DIGIT_BASE,
    EOS_ID,
    ESCAPE_ID,
    FINAL_DIGIT_ID,
    PAD_ID,
    SEP_ID,
)
from privtune.common.ult.keys import band_permutation

from .conftest import ENGLISH, KEY, OTHER_KEY, english_table, tokenizer

EXPLICIT = [
    "",
    "\n",
    "\t",
    "\x00",
    "\r\n\r\n",
    "\U0010ffff",
    "\U0001f600",
    "a\x00b\n\tc\U0010ffff",
    "aaaaaaaaaaaaaaaaaaaaaaaaa",
    "abababababababab",
    " " * 17,
    "\x00" * 9,
    "\U0010ffff\x00" * 8,
    "日本語のテキスト🎉🎉",
    "\ufffd",
    ENGLISH,
]


@pytest.mark.parametrize("patch_size", range(1, 17))
@pytest.mark.parametrize("keyed", [False, True])
def test_explicit_round_trips(patch_size, keyed):
    tok = tokenizer(patch_size, keyed)
    for text in EXPLICIT:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids, strict=True) == text
    assert tok.encode_batch(EXPLICIT) == [tok.encode(t) for t in EXPLICIT]
    assert tok.decode_batch(tok.encode_batch(EXPLICIT), strict=True) == EXPLICIT


@settings(max_examples=400, deadline=None)
@given(text=st.text(), patch_size=st.integers(1, 16), keyed=st.booleans())
def test_round_trip_any_text(text, patch_size, keyed):
    tok = tokenizer(patch_size, keyed)
    assert tok.decode(tok.encode(text), strict=True) == text


@settings(max_examples=200, deadline=None)
@given(prompt=st.text(min_size=1), continuation=st.text(), patch_size=st.integers(1, 16), keyed=st.booleans())
def test_a_prompt_ends_on_a_patch_boundary_so_a_continuation_decodes_after_it(prompt, continuation, patch_size, keyed):
    tok = tokenizer(patch_size, keyed)
    ids = tok.encode_prompt(prompt)
    assert ids[-1] == SEP_ID
    padded = tok.decode(ids[:-1], strict=True)
    assert padded.endswith(prompt) and set(padded[: len(padded) - len(prompt)]) <= {" "}
    assert len(padded) % patch_size == 0 and len(padded) - len(prompt) < patch_size
    assert tok.decode(ids + tok.encode(continuation), strict=bool(continuation)) == padded + continuation


@settings(max_examples=100, deadline=None)
@given(texts=st.lists(st.text(), max_size=6), patch_size=st.integers(1, 16))
def test_batch_equals_one_by_one(texts, patch_size):
    tok = tokenizer(patch_size, True)
    batch = tok.encode_batch(texts, add_special_tokens=True)
    assert batch == [tok.encode(t, add_special_tokens=True) for t in texts]
    assert tok.decode_batch(batch, strict=True) == texts


@settings(max_examples=100, deadline=None)
@given(text=st.text(st.characters(codec=None, categories=["Cs", "Co", "Cn", "Cc"])))
def test_lone_surrogates_and_unassigned_code_points(text):
    tok = tokenizer(8, True)
    assert tok.decode(tok.encode(text), strict=True) == text


def test_unseen_symbols_take_the_escape_path_and_decode_exactly():
    tok = tokenizer(8, True)
    text = "中文文本和表情符号 😀🚀 mixed with English"
    ids = tok.encode(text)
    assert ESCAPE_ID in ids
    assert tok.decode(ids, strict=True) == text


def test_symbols_past_capacity_are_escaped_not_mapped_to_a_neighbour():
    config = UltConfig(vocab_size=UltConfig().base + 5, patch_size=8, band_width=2)
    table = build_table([ENGLISH], config)
    assert len(table.symbols) == 5
    tok = UltTokenizer(table)
    ids = tok.encode(ENGLISH)
    assert ids.count(ESCAPE_ID) > 100
    assert tok.decode(ids, strict=True) == ENGLISH


def test_framing_tokens_are_ignored():
    tok = tokenizer(8, True)
    text = "To be, or not to be"
    ids = tok.encode(text, add_special_tokens=True)
    assert ids[0] == BOS_ID and ids[-1] == EOS_ID
    assert tok.decode([PAD_ID, *ids, PAD_ID, PAD_ID], strict=True) == text


def in_table_ids(tok: UltTokenizer) -> list[int]:
    """Every id with a meaning under ``tok``'s table: the reserved ids and the ranks that hold symbols."""
    config = tok.table.config
    ranks = band_permutation(KEY, config)[: len(tok.table.symbols)]
    return list(range(config.base)) + (config.base + ranks).tolist()


@settings(max_examples=300, deadline=None)
@given(data=st.data(), patch_size=st.sampled_from([1, 3, 8, 16]))
def test_every_sequence_of_in_table_ids_decodes_strictly(data, patch_size):
    tok = tokenizer(patch_size, True)
    ids = data.draw(st.lists(st.sampled_from(in_table_ids(tok)), max_size=120))
    text = tok.decode(ids, strict=True)
    # The table holds no U+FFFD: only digits (which can spell any character) may produce one.
    assert "\ufffd" not in text or any(CONTINUE_DIGIT_ID <= i < FINAL_DIGIT_ID + DIGIT_BASE for i in ids)
    assert tok.decode(tok.encode(text), strict=True) == text


@settings(max_examples=300, deadline=None)
@given(ids=st.lists(st.integers(-3, 600), max_size=80))
def test_each_id_outside_the_table_reads_as_exactly_one_replacement_character(ids):
    tok = tokenizer(8, True)
    known = set(in_table_ids(tok))
    # The same sequence with every unknown id spelled as the run of one U+FFFD decodes identically.
    spelled = tok.encode("\ufffd")
    replaced = [piece for i in ids for piece in ([i] if i in known else spelled)]
    assert tok.decode(ids) == tok.decode(replaced, strict=True)


@pytest.mark.parametrize("ids", [[4000], [500], [-1]])
def test_strict_decode_refuses_ids_outside_the_table(ids):
    tok = tokenizer(8, True)
    with pytest.raises(PrivtuneError, match="not in this ULT table"):
        tok.decode(ids, strict=True)
    assert tok.decode(ids) == "\ufffd"


@pytest.mark.parametrize(
    "ids",
    [
        [CONTINUE_DIGIT_ID],  # a digit without an escape
        [ESCAPE_ID, CONTINUE_DIGIT_ID],  # an escape without a final digit
        [ESCAPE_ID, FINAL_DIGIT_ID + 1] * 3,  # codes no text encoding makes
        [ESCAPE_ID],
        [SEP_ID, SEP_ID],  # empty patches
    ],
)
def test_malformed_escapes_and_empty_patches_still_decode(ids):
    assert isinstance(tokenizer(8, True).decode(ids, strict=True), str)


def test_patches_of_any_length_decode():
    tok = tokenizer(8, False)
    ids = tok.encode("abc") + [SEP_ID] + tok.encode("defgh")
    assert tok.decode(ids, strict=True) == "abcdefgh"
    merged = [i for i in tok.encode("To be, or not to be") if i != SEP_ID]
    assert len(tok.decode(merged, strict=True)) == len("To be, or not to be")


def test_key_changes_ids_but_not_their_band():
    public, keyed = tokenizer(8, False), tokenizer(8, True)
    a, b = public.encode(ENGLISH), keyed.encode(ENGLISH)
    assert a != b and len(a) == len(b)
    base, width = english_table().config.base, english_table().config.band_width
    assert all((x - base) // width == (y - base) // width for x, y in zip(a, b) if x >= base)


def test_wrong_key_is_refused_and_would_decode_to_garbage():
    table = english_table()
    with pytest.raises(WrongKeyError, match="wrong ULT key"):
        UltTokenizer(bind_key(table, KEY), OTHER_KEY)
    with pytest.raises(WrongKeyError, match="bound to a secret key"):
        UltTokenizer(bind_key(table, KEY), None)
    # Without a check value nothing stops the wrong key, and it reads garbage.
    ids = UltTokenizer(table, KEY).encode(ENGLISH)
    assert UltTokenizer(table, OTHER_KEY).decode(ids) != ENGLISH
    assert UltTokenizer(table, None).decode(ids) != ENGLISH


def test_decode_takes_tensors_and_refuses_batches():
    import torch

    tok = tokenizer(8, True)
    ids = tok.encode("To be, or not to be")
    assert tok.decode(torch.tensor([ids])) == tok.decode(torch.tensor(ids)) == "To be, or not to be"
    with pytest.raises(ValueError, match="decode_batch"):
        tok.decode(torch.tensor([ids, ids]))
