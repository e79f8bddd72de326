"""One tokenizer interface for every text codec the models train on.

Three kinds of token ids feed a causal LM here: a Hugging Face tokenizer's (SmolLM2, user models),
raw UTF-8 bytes (tiny in-process test models) and ULT ids (``common.ult``). The rest of the code
only needs ``encode``/``decode`` without special tokens plus the ids of pad/bos/eos, so each kind is
wrapped to that small protocol.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class TextTokenizer(Protocol):
    vocab_size: int
    pad_token_id: int
    bos_token_id: int
    eos_token_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens 3..258, with pad=0, bos=1, eos=2. Lossless for every string."""

    pad_token_id = 0
    bos_token_id = 1
    eos_token_id = 2
    offset = 3
    vocab_size = 259

    def encode(self, text: str) -> list[int]:
        return [b + self.offset for b in text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        data = bytes(i - self.offset for i in ids if self.offset <= i < self.offset + 256)
        return data.decode("utf-8", errors="replace")

    def save(self, folder) -> None:
        """Write the same codec as a Hugging Face tokenizer, so ``AutoTokenizer`` reads the folder too.

        Byte-level BPE without merges: each UTF-8 byte is one token, ``offset + byte``, as here.
        """
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        vocab = {"<pad>": self.pad_token_id, "<s>": self.bos_token_id, "</s>": self.eos_token_id}
        vocab.update({char: byte + self.offset for byte, char in bytes_to_unicode().items()})
        codec = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        codec.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        codec.decoder = decoders.ByteLevel()
        hf = PreTrainedTokenizerFast(tokenizer_object=codec, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
        hf.save_pretrained(folder)


class HFTokenizer:
    """A Hugging Face tokenizer seen through :class:`TextTokenizer` (no special tokens added)."""

    def __init__(self, tokenizer) -> None:
        self.hf = tokenizer
        self.vocab_size = len(tokenizer)
        eos = tokenizer.eos_token_id
        self.eos_token_id = int(eos if eos is not None else 0)
        bos = tokenizer.bos_token_id
        self.bos_token_id = int(bos if bos is not None else self.eos_token_id)
        pad = tokenizer.pad_token_id
        self.pad_token_id = int(pad if pad is not None else self.eos_token_id)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        # The Rust tokenizer, when it would neither truncate nor pad, gives the wrapper's ids without its
        # per-call Python overhead (a fifth of the time on a whole corpus).
        plain = backend is not None and backend.truncation is None and backend.padding is None
        self._backend = backend if plain else None

    def encode(self, text: str) -> list[int]:
        if self._backend is not None:
            return list(self._backend.encode(text, add_special_tokens=False).ids)
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=True)

    def save(self, folder) -> None:
        self.hf.save_pretrained(folder)
