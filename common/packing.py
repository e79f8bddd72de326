"""Tokenised training data: documents -> fixed-length blocks of token ids.

Blocks are packed per corpus (per data owner), never across corpora, so no block mixes two owners'
text. Within a corpus, documents are joined with an end-of-sequence token; each document's tail is
held out for evaluation so that train and held-out text never overlap.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from privtune.common.corpus import Document
from privtune.common.errors import PrivtuneError
from privtune.common.text_tokenizer import TextTokenizer


@dataclass(frozen=True)
class Split:
    train: list[Document]
    heldout: list[Document]


def holdout_split(documents: list[Document], fraction: float = 0.1) -> Split:
    """Cut the last ``fraction`` of every document off as held-out text."""
    if not 0.0 < fraction < 1.0:
        raise PrivtuneError(f"held-out fraction must be in (0, 1), got {fraction}")
    train, heldout = [], []
    for doc in documents:
        cut = int(len(doc.text) * (1.0 - fraction))
        train.append(Document(doc.name, doc.text[:cut]))
        heldout.append(Document(doc.name, doc.text[cut:]))
    return Split(train, heldout)


def pack(
    documents: list[Document], tokenizer: TextTokenizer, block_size: int, max_blocks: int | None = None
) -> torch.Tensor:
    """Tokenise and pack documents into a ``[n_blocks, block_size]`` LongTensor.

    The stream ``doc1 <eos> doc2 <eos> ...`` is cut into consecutive blocks; a trailing partial block
    is dropped. Raises if the documents are too short to fill a single block.
    """
    if block_size < 2:
        raise PrivtuneError(f"block size must be at least 2, got {block_size}")
    stream: list[int] = []
    limit = None if max_blocks is None else max_blocks * block_size
    for doc in documents:
        stream.extend(tokenizer.encode(doc.text))
        stream.append(tokenizer.eos_token_id)
        if limit is not None and len(stream) >= limit:
            break
    n_blocks = len(stream) // block_size
    if max_blocks is not None:
        n_blocks = min(n_blocks, max_blocks)
    if n_blocks == 0:
        raise PrivtuneError(
            f"{len(documents)} document(s) give only {len(stream)} tokens, fewer than one block of {block_size}; "
            "add text or lower the block size"
        )
    return torch.tensor(stream[: n_blocks * block_size], dtype=torch.long).view(n_blocks, block_size)
