import pytest
import torch

from privtune.common.corpus import Document
from privtune.common.errors import PrivtuneError
from privtune.common.packing import holdout_split, pack
from privtune.common.text_tokenizer import ByteTokenizer


def test_pack_joins_documents_with_eos_and_drops_partial_block():
    tok = ByteTokenizer()
    docs = [Document("a", "abcd"), Document("b", "efg")]
    blocks = pack(docs, tok, block_size=3)
    stream = tok.encode("abcd") + [tok.eos_token_id] + tok.encode("efg") + [tok.eos_token_id]
    assert blocks.shape == (3, 3)
    assert blocks.flatten().tolist() == stream[:9]
    assert pack(docs, tok, block_size=3, max_blocks=2).shape == (2, 3)


def test_partitions_never_share_a_block():
    tok = ByteTokenizer()
    owner_a = [Document("a", "A" * 50)]
    owner_b = [Document("b", "B" * 50)]
    for owner, letter in ((owner_a, "A"), (owner_b, "B")):
        text = tok.decode(pack(owner, tok, 8).flatten().tolist())
        assert set(text) == {letter}


def test_holdout_is_the_tail_of_each_document():
    split = holdout_split([Document("a", "0123456789")], fraction=0.2)
    assert split.train[0].text == "01234567" and split.heldout[0].text == "89"
    with pytest.raises(PrivtuneError):
        holdout_split([], fraction=1.5)


def test_too_little_text_is_a_clear_error():
    with pytest.raises(PrivtuneError, match="fewer than one block"):
        pack([Document("a", "hi")], ByteTokenizer(), 64)
    assert pack([Document("a", "hi")], ByteTokenizer(), 2).dtype == torch.long
