"""The tokenizer a causal LM trains on: text <-> ids under a ULT table and (optionally) a key."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from privtune.common.errors import PrivtuneError
from privtune.common.ult.config import BOS_ID, EOS_ID, ESCAPE_ID, PAD_ID, SEP_ID
from privtune.common.ult.keys import UltKey, key_from_passphrase, load_key_file
from privtune.common.ult.mapping import SymbolMapper
from privtune.common.ult.table import LookupTable, load_table
from privtune.common.ult.text import TextCodec


class UltTokenizer:
    """Encode text to ids ``< vocab_size`` and decode ids (including a model's output) to text.

    Every id sequence decodes (pad/bos/eos are ignored), and ``decode(encode(x)) == x`` for every
    string. ``decode`` is tolerant by default: an id outside the table reads as U+FFFD, so sampling
    from a model never crashes it; ``strict=True`` raises on such an id instead.
    """

    def __init__(self, table: LookupTable, key: UltKey | None = None) -> None:
        if table.modality != "text":
            raise PrivtuneError(
                f"a {table.modality} ULT table cannot tokenize text; build one with 'privtune ult build-table'"
            )
        self.table = table
        self._codec = TextCodec(table.config.patch_size)
        self._mapper = SymbolMapper(table, key, self._codec.canonical)
        self.vocab_size = table.config.vocab_size
        self.pad_token_id = PAD_ID
        self.bos_token_id = BOS_ID
        self.eos_token_id = EOS_ID
        self.sep_token_id = SEP_ID
        self.escape_token_id = ESCAPE_ID

    @classmethod
    def from_files(
        cls,
        table_path: str | os.PathLike[str],
        key_file: str | os.PathLike[str] | None = None,
        passphrase: str | None = None,
    ) -> UltTokenizer:
        if key_file is not None and passphrase is not None:
            raise PrivtuneError("give a ULT key file or a passphrase, not both")
        key = (
            load_key_file(key_file)
            if key_file is not None
            else key_from_passphrase(passphrase)
            if passphrase is not None
            else None
        )
        return cls(load_table(table_path), key)

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.encode_batch([text], add_special_tokens)[0]

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
        if isinstance(texts, str):
            raise TypeError("encode_batch takes a sequence of texts; use encode for one text")
        stream, per_text = self._codec.encode_batch(texts)
        ids, bounds = self._mapper.to_ids(stream, np.concatenate(([0], np.cumsum(per_text))))
        lists = [ids[a:b].tolist() for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist())]
        if add_special_tokens:
            return [[BOS_ID, *seq, EOS_ID] for seq in lists]
        return lists

    def encode_prompt(self, text: str) -> list[int]:
        """Ids for a model to continue: ``text`` left-padded with spaces to whole patches, then a separator.

        Each patch is a block transform of ``patch_size`` characters; a prompt ending inside one
        would ask the model to extend a block whose transform already closed, and it continues
        with garbage. Padding at the front keeps the whole prompt and puts its end on a boundary.
        """
        padded = " " * (-len(text) % self.table.config.patch_size) + text
        return [*self.encode(padded), SEP_ID] if padded else []

    def decode(self, ids: Sequence[int] | np.ndarray, strict: bool = False) -> str:
        """Text of one id sequence (a list, array or CPU tensor; a ``(1, n)`` batch is accepted)."""
        return self.decode_batch([ids], strict)[0]

    def decode_batch(self, sequences: Sequence[Sequence[int] | np.ndarray], strict: bool = False) -> list[str]:
        arrays = [_id_array(seq) for seq in sequences]
        if any(a.ndim > 1 and a.shape[0] != 1 for a in arrays):
            raise ValueError("decode takes one id sequence; use decode_batch for a batch")
        if not arrays:
            return []
        stream = self._mapper.to_stream(arrays, strict)
        return self._codec.decode_batch(stream, len(arrays))


def _id_array(ids: Sequence[int] | np.ndarray) -> np.ndarray:
    """Ids as an integer array; a list converts fastest straight into the narrowest type its ids fit."""
    if isinstance(ids, list):
        for dtype in (np.int16, np.int32):
            try:
                return np.fromiter(ids, dtype=dtype, count=len(ids))
            except (OverflowError, TypeError, ValueError):
                pass
    array = np.asarray(ids)
    return array if np.issubdtype(array.dtype, np.integer) else array.astype(np.int64)
