"""The lookup table: symbols ranked by frequency, built once in one streaming pass, saved as JSON.

A symbol is a non-negative integer code produced by the text codec (a BWTS run); the table does
not care what it means. Keeping symbols as integers is what lets the tokenizer look up a whole
batch at once and spell any unseen symbol exactly on the escape path. Counting is one pass over
the corpus and ranking happens once at the end.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from privtune.common.errors import PrivtuneError
from privtune.common.ult.config import UltConfig
from privtune.common.ult.text import TextCodec

FORMAT = "privtune-ult-table"
VERSION = 2
"""Version 2: symbols are runs of the bijective BWT; version 1 tables (BWT with an end marker) are refused."""
MODALITIES = ("text",)
KEY_CHECK_BYTES = 16
_BATCH_CHARS = 1 << 20


@dataclass(frozen=True)
class LookupTable:
    """Symbols in rank order (rank r -> public token id ``config.base + r``).

    ``key_check`` is set when the table is bound to a secret key (see :func:`common.ult.keys.bind_key`);
    ``codec`` holds the parameters of the modality codec the symbols came from, so decoding
    cannot silently use different ones.
    """

    config: UltConfig
    modality: str
    symbols: tuple[int, ...]
    codec: Mapping[str, Any] = field(default_factory=dict)
    key_check: bytes | None = None

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise PrivtuneError(f"ULT table: unknown modality {self.modality!r}; expected one of {MODALITIES}")
        if len(self.symbols) > self.config.capacity:
            raise PrivtuneError(
                f"ULT table holds {len(self.symbols)} symbols but vocab_size {self.config.vocab_size} "
                f"has room for {self.config.capacity}"
            )

    def symbol_array(self) -> np.ndarray:
        return np.asarray(self.symbols, dtype=np.int64)


def build_table(corpus: Iterable[str | os.PathLike[str]], config: UltConfig | None = None) -> LookupTable:
    """Rank the text symbols of ``corpus`` (strings, or paths of UTF-8 files read in chunks).

    This is the model owner's public, unkeyed table in a federation; a data owner's secret lies
    in the key applied on top (:mod:`common.ult.keys`), not in this ranking.
    """
    config = config or UltConfig()
    codec = TextCodec(config.patch_size)
    streams = (codec.encode_batch(batch)[0] for batch in _text_batches(corpus, config.patch_size))
    table = build_symbol_table(streams, config, "text", {})
    if not table.symbols:
        raise PrivtuneError("the ULT corpus holds no text: give files (or strings) with some characters in them")
    return table


def build_symbol_table(
    streams: Iterable[np.ndarray], config: UltConfig, modality: str, codec: Mapping[str, Any]
) -> LookupTable:
    """Count the symbols (entries >= 0) of every stream, then rank by count, ties by code."""
    counts: dict[int, int] = {}
    for stream in streams:
        stream = np.asarray(stream, dtype=np.int64)
        codes, n = np.unique(stream[stream >= 0], return_counts=True)
        for code, count in zip(codes.tolist(), n.tolist()):
            counts[code] = counts.get(code, 0) + count
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[: config.capacity]
    return LookupTable(config, modality, tuple(code for code, _ in ranked), dict(codec))


def _text_batches(corpus: Iterable[str | os.PathLike[str]], patch_size: int) -> Iterator[list[str]]:
    """Group texts into ~1M-character batches; files are read in patch-aligned chunks.

    Chunks start at multiples of the patch size, so a file yields exactly the patches it would
    as one string (separators between chunks are not table symbols), in bounded memory.
    """
    batch: list[str] = []
    size = 0
    for item in corpus:
        pieces = _file_chunks(Path(item), patch_size) if isinstance(item, os.PathLike) else (item,)
        for piece in pieces:
            batch.append(piece)
            size += len(piece)
            if size >= _BATCH_CHARS:
                yield batch
                batch, size = [], 0
    if batch:
        yield batch


def _file_chunks(path: Path, patch_size: int) -> Iterator[str]:
    chunk = patch_size * (_BATCH_CHARS // patch_size)
    try:
        with path.open("r", encoding="utf-8", errors="surrogateescape", newline="") as handle:
            while piece := handle.read(chunk):
                yield piece
    except OSError as err:
        raise PrivtuneError(f"cannot read corpus file {path}: {err.strerror or err}") from err


def save_table(table: LookupTable, path: str | os.PathLike[str]) -> Path:
    """Write ``table`` as versioned JSON (atomically; key-bound tables readable by the owner only)."""
    path = Path(path)
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "modality": table.modality,
        "config": table.config.to_dict(),
        "base": table.config.base,
        "codec": dict(table.codec),
        "key_check": table.key_check.hex() if table.key_check is not None else None,
        "symbols": list(table.symbols),
    }
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(payload, separators=(",", ":")) + "\n")
        if table.key_check is not None:
            os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except OSError as err:
        raise PrivtuneError(f"cannot write ULT table {path}: {err.strerror or err}") from err
    return path


def load_table(path: str | os.PathLike[str]) -> LookupTable:
    """Read a table written by :func:`save_table`; anything else raises PrivtuneError naming ``path``."""
    path = Path(path)
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise PrivtuneError(f"cannot read ULT table {path}: {err.strerror or err}") from err
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PrivtuneError(f"{path} is not a ULT table (not valid JSON: {err})") from err
    try:
        return _table_from_payload(payload)
    except (KeyError, TypeError, ValueError, PrivtuneError) as err:
        raise PrivtuneError(f"{path} is not a valid ULT table: {err}") from err


def _table_from_payload(payload: Any) -> LookupTable:
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"missing format marker {FORMAT!r}")
    if payload.get("version") != VERSION:
        raise ValueError(
            f"format version {payload.get('version')!r}, this privtune reads version {VERSION}; "
            "rebuild it with 'privtune ult build-table'"
        )
    config = UltConfig(**payload["config"])
    if payload.get("base") != config.base:
        raise ValueError(f"base id {payload.get('base')!r} does not match this privtune's id layout ({config.base})")
    symbols = payload["symbols"]
    if not isinstance(symbols, list) or not all(type(s) is int and s >= 0 for s in symbols):
        raise ValueError("symbols must be a list of non-negative integers")
    if len(set(symbols)) != len(symbols):
        raise ValueError("symbols contain duplicates")
    key_check = payload.get("key_check")
    if key_check is not None:
        key_check = bytes.fromhex(key_check)
        if len(key_check) != KEY_CHECK_BYTES:
            raise ValueError(f"key_check must be {KEY_CHECK_BYTES} bytes")
    codec = payload.get("codec", {})
    if not isinstance(codec, dict):
        raise ValueError("codec must be an object")
    return LookupTable(config, payload["modality"], tuple(symbols), codec, key_check)
