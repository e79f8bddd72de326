"""Instruction (chat) data: one ``.jsonl`` line is one conversation, trained on its responses only.

A line holds either ``prompt`` and ``response`` strings (and optionally a ``system`` string), or
``messages``: a list of ``{"role", "content"}`` with roles ``system``, ``user`` and ``assistant``.
Every assistant message is a response; everything else is prompt.

Formatting: with the model's chat template when its tokenizer has one, else the plain format
``System: ...\\n`` / ``User: ...\\n`` / ``Assistant: `` + response + end-of-sequence. The text is cut
into prompt and response segments and each segment is tokenised on its own, so no token straddles
the boundary and the label mask is exact: a response segment (its content and the template's
end-of-turn markup after it, so the model learns to stop) is labelled with its ids, every other
token with :data:`~privtune.common.tokens.IGNORE`. Under ULT, whose codec works in patches, the ids
of a conversation are its segments' codes one after another, and decode segment by segment.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from privtune.common.errors import PrivtuneError
from privtune.common.text_tokenizer import HFTokenizer, TextTokenizer
from privtune.common.tokens import IGNORE, Tokens

ROLES = ("system", "user", "assistant")
PLAIN_LABELS = {"system": "System", "user": "User", "assistant": "Assistant"}
INSTRUCTION_FIELDS = ("messages", "prompt", "response")


@dataclass(frozen=True)
class Turn:
    role: str
    content: str


def is_instruction(record: object) -> bool:
    """Whether a parsed ``.jsonl`` line is instruction data (rather than a ``text`` line)."""
    return isinstance(record, Mapping) and any(field in record for field in INSTRUCTION_FIELDS)


def parse_turns(record: Mapping[str, Any], where: str) -> tuple[Turn, ...]:
    """The conversation of one instruction line; ``where`` (``file:line``) names it in every error."""
    if "messages" in record:
        turns = _messages(record["messages"], where)
    else:
        turns = _prompt_response(record, where)
    _check_conversation(turns, where)
    return turns


def _string_field(record: Mapping[str, Any], field: str, where: str) -> str:
    if field not in record:
        raise PrivtuneError(
            f"{where}: instruction line has no {field!r} field; give 'prompt' and 'response' strings, or 'messages'"
        )
    value = record[field]
    if not isinstance(value, str):
        raise PrivtuneError(f"{where}: field {field!r} must be a string, got {type(value).__name__}")
    return value


def _prompt_response(record: Mapping[str, Any], where: str) -> tuple[Turn, ...]:
    system = (Turn("system", _string_field(record, "system", where)),) if "system" in record else ()
    prompt = _string_field(record, "prompt", where)
    response = _string_field(record, "response", where)
    return (*system, Turn("user", prompt), Turn("assistant", response))


def _messages(messages: object, where: str) -> tuple[Turn, ...]:
    if not isinstance(messages, list) or not messages:
        raise PrivtuneError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    turns = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise PrivtuneError(f"{where}: messages[{i}] must be an object with 'role' and 'content'")
        role = _string_field(message, "role", f"{where} messages[{i}]")
        if role not in ROLES:
            raise PrivtuneError(f"{where}: messages[{i}] has role {role!r}; roles are {', '.join(ROLES)}")
        turns.append(Turn(role, _string_field(message, "content", f"{where} messages[{i}]")))
    return tuple(turns)


def _check_conversation(turns: Sequence[Turn], where: str) -> None:
    """A prompt before the first response, non-empty responses, and a response at the end."""
    roles = [t.role for t in turns]
    if "assistant" not in roles or "user" not in roles[: roles.index("assistant")]:
        raise PrivtuneError(f"{where}: a conversation needs a user message followed by an assistant response")
    if roles[-1] != "assistant":
        raise PrivtuneError(f"{where}: the last message must be the assistant's response, not {roles[-1]!r}")
    for turn in turns:
        if turn.role == "assistant" and not turn.content.strip():
            raise PrivtuneError(f"{where}: empty response; every assistant message needs text to train on")


def plain_text(turns: Sequence[Turn]) -> str:
    """The conversation in the plain format, as text (line ends where the tokens end a response)."""
    return "".join(f"{PLAIN_LABELS[t.role]}: {t.content}\n" for t in turns)


def chat_template(tokenizer: TextTokenizer) -> str | None:
    """The tokenizer's chat template, if it is a Hugging Face tokenizer that has one."""
    if isinstance(tokenizer, HFTokenizer):
        return getattr(tokenizer.hf, "chat_template", None) or None
    return None


def conversation_tokens(turns: Sequence[Turn], tokenizer: TextTokenizer, where: str = "") -> Tokens:
    """The conversation's ids, labelled on its responses only (module docstring)."""
    if isinstance(tokenizer, HFTokenizer) and chat_template(tokenizer) is not None:
        segments = _template_segments(tokenizer, turns, where)
        return _joined([_segment(tokenizer.encode(text), response) for text, response in segments if text])
    return _plain_tokens(turns, tokenizer)


def _segment(ids: list[int], response: bool) -> Tokens:
    return Tokens.plain(ids) if response else Tokens(ids, [IGNORE] * len(ids))


def _joined(parts: list[Tokens]) -> Tokens:
    return Tokens([i for part in parts for i in part.ids], [label for part in parts for label in part.labels])


def _plain_tokens(turns: Sequence[Turn], tokenizer: TextTokenizer) -> Tokens:
    parts = []
    for turn in turns:
        label = f"{PLAIN_LABELS[turn.role]}: "
        if turn.role == "assistant":
            parts.append(_segment(tokenizer.encode(label), False))
            parts.append(_segment([*tokenizer.encode(turn.content), tokenizer.eos_token_id], True))
        else:
            parts.append(_segment(tokenizer.encode(f"{label}{turn.content}\n"), False))
    return _joined(parts)


def _render(tokenizer: HFTokenizer, turns: Sequence[Turn], generation_prompt: bool, where: str) -> str:
    from jinja2.exceptions import TemplateError

    messages = [{"role": t.role, "content": t.content} for t in turns]
    try:
        text = tokenizer.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except (TemplateError, ValueError) as err:
        raise PrivtuneError(f"{where}: the model's chat template refuses this conversation ({err})") from None
    return str(text)


def _template_segments(tokenizer: HFTokenizer, turns: Sequence[Turn], where: str) -> list[tuple[str, bool]]:
    """(text, is_response) pieces of the templated conversation, found by rendering its growing prefixes.

    Response i spans from the end of the render of the turns before it (with the generation prompt)
    to the end of the render through it; the template must render every prefix as a prefix of the
    whole, or the response tokens cannot be told apart and the conversation is refused.
    """
    full = _render(tokenizer, turns, False, where)
    segments: list[tuple[str, bool]] = []
    done = 0
    for i, turn in enumerate(turns):
        if turn.role != "assistant":
            continue
        prompt = _render(tokenizer, turns[:i], True, where)
        end = _render(tokenizer, turns[: i + 1], False, where)
        start = len(prompt)
        if not (start >= done and full.startswith(end) and end.startswith(prompt) and len(end) > start):
            raise PrivtuneError(
                f"{where}: the model's chat template does not render this conversation's turns as prefixes of one "
                "another, so its responses cannot be located; use a model whose template does, or prompt/response lines"
            )
        segments += [(full[done:start], False), (full[start : len(end)], True)]
        done = len(end)
    segments.append((full[done:], False))
    return segments
