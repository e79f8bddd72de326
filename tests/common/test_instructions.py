"""Instruction data: per-file detection, malformed lines named by file and line, exact label masks
with the plain format and with a chat template, held-out conversations and record rows."""

from __future__ import annotations

import json

import pytest

from privtune.common.corpus import Document, local_documents
from privtune.common.errors import PrivtuneError
from privtune.common.instructions import Turn, conversation_tokens
from privtune.common.packing import holdout_split, pack_rows, record_rows
from privtune.common.text_tokenizer import ByteTokenizer, HFTokenizer
from privtune.common.tokens import IGNORE, PAD

MESSAGE_USER = {"role": "user", "content": "and?"}
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Yo"},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "Ciao"},
]


TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '</s>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


@pytest.fixture
def templated(tmp_path) -> HFTokenizer:
    """The byte codec as a Hugging Face tokenizer with a chat template (``</s>`` is its eos token)."""
    from transformers import AutoTokenizer

    ByteTokenizer().save(tmp_path / "tok")
    hf = AutoTokenizer.from_pretrained(tmp_path / "tok")
    hf.chat_template = TEMPLATE
    return HFTokenizer(hf)


def write_lines(folder, name: str, lines: list) -> None:
    folder.mkdir(exist_ok=True)
    (folder / name).write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines))


def test_instruction_files_are_detected_per_file(tmp_path):
    write_lines(tmp_path, "chat.jsonl", [{"prompt": "Hi", "response": "Yo"}, {"messages": MESSAGES}])
    write_lines(tmp_path, "texts.jsonl", [{"text": "plain"}])
    chat_a, chat_b, text = local_documents(tmp_path)
    assert chat_a.turns == (Turn("user", "Hi"), Turn("assistant", "Yo")) and chat_a.name == "chat:1"
    assert chat_a.text == "User: Hi\nAssistant: Yo\n"
    assert [t.role for t in chat_b.turns] == ["system", "user", "assistant", "user", "assistant"]
    assert text.turns == () and text.text == "plain"


@pytest.mark.parametrize(
    "line,message",
    [
        ({"prompt": "q"}, "no 'response' field"),
        ({"response": "a"}, "no 'prompt' field"),
        ({"prompt": 3, "response": "a"}, "field 'prompt' must be a string, got int"),
        ({"prompt": "q", "response": " \n"}, "empty response"),
        ({"prompt": "q", "response": "a", "system": ["s"]}, "field 'system' must be a string"),
        ({"messages": "hello"}, "'messages' must be a non-empty list"),
        ({"messages": []}, "'messages' must be a non-empty list"),
        ({"messages": ["hi"]}, r"messages\[0\] must be an object"),
        ({"messages": [{"role": "user"}]}, r"messages\[0\]: instruction line has no 'content' field"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "has role 'tool'"),
        ({"messages": [{"role": "user", "content": "q"}]}, "needs a user message followed by an assistant"),
        ({"messages": [{"role": "assistant", "content": "a"}]}, "needs a user message followed by an assistant"),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]},
            "empty response",
        ),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, MESSAGE_USER]},
            "last message must be the assistant's",
        ),
        ({"text": "a text line"}, "is a text line in a file of instruction"),
        ("{not json", "is not valid JSON"),
    ],
)
def test_a_malformed_line_is_named_by_file_and_line(tmp_path, line, message):
    write_lines(tmp_path, "chat.jsonl", [{"prompt": "fine", "response": "ok"}, "", line])
    with pytest.raises(PrivtuneError, match=message) as err:
        local_documents(tmp_path)
    assert f"{tmp_path / 'chat.jsonl'}:3" in str(err.value)


def test_the_plain_format_masks_everything_but_the_responses_and_their_eos():
    tok = ByteTokenizer()
    tokens = conversation_tokens((Turn("user", "Hi"), Turn("assistant", "Yo")), tok)
    prompt = tok.encode("User: Hi\nAssistant: ")
    response = [*tok.encode("Yo"), tok.eos_token_id]
    assert tokens.ids == prompt + response
    assert tokens.labels == [IGNORE] * len(prompt) + response


def test_the_chat_template_masks_prompt_and_markup_but_not_the_end_of_turn(templated):
    turns = tuple(Turn(m["role"], m["content"]) for m in MESSAGES)
    tokens = conversation_tokens(turns, templated)
    eos = templated.eos_token_id
    assert templated.encode("</s>") == [eos]  # the end-of-turn marker is one token

    def enc(text: str) -> list[int]:
        return templated.encode(text)

    pieces = [
        (enc("<|system|>\nBe brief.</s>\n<|user|>\nHi</s>\n<|assistant|>\n"), False),
        (enc("Yo</s>\n"), True),
        (enc("<|user|>\nBye</s>\n<|assistant|>\n"), False),
        (enc("Ciao</s>\n"), True),
    ]
    assert tokens.ids == [i for ids, _ in pieces for i in ids]
    assert tokens.labels == [i if response else IGNORE for ids, response in pieces for i in ids]
    assert templated.hf.decode(tokens.ids) == templated.hf.apply_chat_template(MESSAGES, tokenize=False)


def test_a_template_that_rewrites_earlier_turns_is_refused(templated):
    # Renders only the last message: a prefix of the conversation is not a prefix of its render.
    templated.hf.chat_template = "{{ messages[-1]['content'] }}{% if add_generation_prompt %}>{% endif %}"
    with pytest.raises(PrivtuneError, match="chat:4: the model's chat template does not render"):
        conversation_tokens((Turn("user", "Hi"), Turn("assistant", "Yo")), templated, "chat:4")


def test_conversations_are_held_out_whole_and_packed_with_their_labels():
    tok = ByteTokenizer()
    chats = [Document.conversation(f"c:{i}", (Turn("user", f"q{i}"), Turn("assistant", f"a{i}"))) for i in range(4)]
    split = holdout_split([Document("t", "0123456789"), *chats], fraction=0.2)
    assert [d.name for d in split.train] == ["t", "c:0", "c:1", "c:2"] and split.train[0].text == "01234567"
    assert [d.name for d in split.heldout] == ["t", "c:3"] and split.heldout[1] is chats[3]
    rows = pack_rows(chats, tok, block_size=8)
    stream = [t for chat in chats for t in zip(*_pair(conversation_tokens(chat.turns, tok)), strict=True)]
    assert (
        list(zip(rows.ids.flatten().tolist(), rows.labels.flatten().tolist(), strict=True))
        == stream[: rows.ids.numel()]
    )


def _pair(tokens):
    return tokens.ids, tokens.labels


def test_record_rows_pad_with_ignored_labels_and_drop_records_without_a_target():
    tok = ByteTokenizer()
    long_prompt = conversation_tokens((Turn("user", "x" * 40), Turn("assistant", "y")), tok)
    short = conversation_tokens((Turn("user", "q"), Turn("assistant", "ab")), tok)
    longer = conversation_tokens((Turn("user", "q"), Turn("assistant", "abcd")), tok)
    rows = record_rows([long_prompt, short, longer], max_tokens=32)
    assert len(rows) == 2  # the long prompt fills the cap: nothing of its response is left to train on
    assert rows.ids.tolist() == [short.ids + [PAD, PAD], longer.ids]
    assert rows.labels.tolist() == [short.labels + [IGNORE, IGNORE], longer.labels]
    with pytest.raises(PrivtuneError, match="two or more tokens"):
        record_rows([long_prompt], max_tokens=32)


def test_ult_runs_use_the_plain_format_over_the_keyed_codec():
    from privtune.common.ult import UltConfig, UltKey, UltTokenizer, bind_key, build_table

    corpus = "User: what is the question?\nAssistant: the answer is this.\n" * 30
    key = UltKey(bytes(range(32)))
    tok = UltTokenizer(
        bind_key(build_table([corpus], UltConfig(vocab_size=512, patch_size=8, band_width=16)), key), key
    )
    tokens = conversation_tokens((Turn("user", "what is it?"), Turn("assistant", "the answer.")), tok)
    prompt = tok.encode("User: what is it?\n") + tok.encode("Assistant: ")  # each turn's markup on its own
    response = [*tok.encode("the answer."), tok.eos_token_id]
    assert tokens.ids == prompt + response
    assert tokens.labels == [IGNORE] * len(prompt) + response
    # The ULT codec works in patches, so a conversation decodes segment by segment, as it was encoded.
    assert tok.decode(response) == "the answer."


@pytest.mark.slow
def test_smollm2_instruct_conversations_tokenise_as_its_chat_template_does():
    from privtune.common.models import load_tokenizer

    tok = load_tokenizer("smollm2")
    turns = tuple(Turn(m["role"], m["content"]) for m in MESSAGES)
    tokens = conversation_tokens(turns, tok)
    rendered = tok.hf.apply_chat_template(MESSAGES, tokenize=True)
    assert tokens.ids == list(rendered["input_ids"] if hasattr(rendered, "keys") else rendered)
    targets = tok.hf.decode([i for i, label in zip(tokens.ids, tokens.labels, strict=True) if label != IGNORE])
    assert targets == "Yo<|im_end|>\nCiao<|im_end|>\n"
