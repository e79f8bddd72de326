"""Tokenised training data: documents -> fixed-length blocks, or one padded row per record, with labels.

Blocks are packed per corpus (per data owner), never across corpora, so no block mixes two owners'
text. Within a corpus, a text document is followed by an end-of-sequence token, a conversation by
whatever its format ends in (:mod:`privtune.common.instructions`). Each text document's tail is held
out for evaluation so that train and held-out text never overlap; conversations are held out whole
(the last of them), since half a conversation is not one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from privtune.common.corpus import Document
from privtune.common.errors import PrivtuneError
from privtune.common.instructions import conversation_tokens
from privtune.common.text_tokenizer import TextTokenizer
from privtune.common.tokens import IGNORE, PAD, TokenRows, Tokens


@dataclass(frozen=True)
class Split:
    train: list[Document]
    heldout: list[Document]


def holdout_split(documents: list[Document], fraction: float = 0.1) -> Split:
    """Cut the last ``fraction`` of every text document off, and hold out the last ``fraction`` of the
    conversations (at least one, when there are two or more)."""
    if not 0.0 < fraction < 1.0:
        raise PrivtuneError(f"held-out fraction must be in (0, 1), got {fraction}")
    conversations = sum(1 for doc in documents if doc.turns)
    kept = conversations - (max(1, int(conversations * fraction)) if conversations >= 2 else 0)
    train: list[Document] = []
    heldout: list[Document] = []
    seen = 0
    for doc in documents:
        if doc.turns:
            (train if seen < kept else heldout).append(doc)
            seen += 1
            continue
        cut = int(len(doc.text) * (1.0 - fraction))
        train.append(Document(doc.name, doc.text[:cut]))
        heldout.append(Document(doc.name, doc.text[cut:]))
    return Split(train, heldout)


def document_tokens(document: Document, tokenizer: TextTokenizer) -> Tokens:
    """A text and an end-of-sequence token, every position a target; a conversation, targets on its responses."""
    if document.turns:
        return conversation_tokens(document.turns, tokenizer, document.name)
    return Tokens.plain([*tokenizer.encode(document.text), tokenizer.eos_token_id])


def pack_rows(
    documents: list[Document], tokenizer: TextTokenizer, block_size: int, max_blocks: int | None = None
) -> TokenRows:
    """Tokenise and pack documents into ``[n_blocks, block_size]`` ids and labels.

    The stream ``doc1 doc2 ...`` (each as :func:`document_tokens`) is cut into consecutive blocks; a
    trailing partial block is dropped. Raises if the documents are too short to fill a single block.
    """
    if block_size < 2:
        raise PrivtuneError(f"block size must be at least 2, got {block_size}")
    ids: list[int] = []
    labels: list[int] = []
    limit = None if max_blocks is None else max_blocks * block_size
    for doc in documents:
        tokens = document_tokens(doc, tokenizer)
        ids += tokens.ids
        labels += tokens.labels
        if limit is not None and len(ids) >= limit:
            break
    n_blocks = len(ids) // block_size
    if max_blocks is not None:
        n_blocks = min(n_blocks, max_blocks)
    if n_blocks == 0:
        raise PrivtuneError(
            f"{len(documents)} document(s) give only {len(ids)} tokens, fewer than one block of {block_size}; "
            "add text or lower the block size"
        )

    def blocks(values: list[int]) -> torch.Tensor:
        return torch.tensor(values[: n_blocks * block_size], dtype=torch.long).view(n_blocks, block_size)

    return TokenRows(blocks(ids), blocks(labels))


def pack(
    documents: list[Document], tokenizer: TextTokenizer, block_size: int, max_blocks: int | None = None
) -> torch.Tensor:
    """The ids of :func:`pack_rows`, for scoring or training where every position counts."""
    return pack_rows(documents, tokenizer, block_size, max_blocks).ids


def record_rows(records: list[Tokens], max_tokens: int) -> TokenRows:
    """One row per record: its first ``max_tokens`` tokens, then :data:`PAD` (label ``IGNORE``) to the longest.

    A record whose first ``max_tokens`` tokens hold no target (a text of fewer than two tokens, or
    an instruction whose prompt fills the cap) trains nothing: it is dropped rather than counted.
    """
    if max_tokens < 2:
        raise PrivtuneError(f"the per-record token cap must be at least 2, got {max_tokens}")
    kept = [cut for record in records if (cut := record[:max_tokens]).targets()]
    if not kept:
        raise PrivtuneError(
            f"no record has two or more tokens with one to train on within its first {max_tokens}: add text, raise "
            "dp-record-max-tokens (an instruction's prompt may fill it), or use the block unit"
        )
    width = max(len(record) for record in kept)
    ids = torch.full((len(kept), width), PAD, dtype=torch.long)
    labels = torch.full((len(kept), width), IGNORE, dtype=torch.long)
    for i, record in enumerate(kept):
        ids[i, : len(record)] = torch.tensor(record.ids, dtype=torch.long)
        labels[i, : len(record)] = torch.tensor(record.labels, dtype=torch.long)
    return TokenRows(ids, labels)
