import copy

import pytest

from privtune.common.models import load_model
from privtune.common.text_tokenizer import ByteTokenizer, HFTokenizer

TEXTS = ["", "plain words", "To be, or not to be </s> that is <s> the question\n\n  é ✓", "x" * 5000]


def wrapper_ids(tokenizer: HFTokenizer, text: str) -> list[int]:
    return list(tokenizer.hf.encode(text, add_special_tokens=False))


def test_the_byte_codec_saved_for_hugging_face_gives_the_same_ids(tmp_path):
    from transformers import AutoTokenizer

    ByteTokenizer().save(tmp_path / "tok")
    tokenizer = HFTokenizer(AutoTokenizer.from_pretrained(tmp_path / "tok"))
    for text in TEXTS:
        assert tokenizer.encode(text) == wrapper_ids(tokenizer, text)


@pytest.mark.slow
def test_smollm2_ids_equal_the_wrapper_s_and_a_truncating_tokenizer_keeps_the_wrapper():
    tokenizer = load_model("smollm2").tokenizer
    assert isinstance(tokenizer, HFTokenizer)
    for text in TEXTS:
        assert tokenizer.encode(text) == wrapper_ids(tokenizer, text)
    hf = copy.deepcopy(tokenizer.hf)  # the loaded model may be shared with other tests
    hf.backend_tokenizer.enable_truncation(4)
    truncating = HFTokenizer(hf)
    assert truncating.encode(TEXTS[2]) == wrapper_ids(truncating, TEXTS[2])
    assert len(truncating.encode(TEXTS[2])) > 4
