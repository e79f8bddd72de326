"""Token ids with their next-token labels: which positions a causal LM is trained (and scored) on.

A label is the token id itself where the position counts, or :data:`IGNORE` where it does not: an
instruction's prompt and chat-template markup, and the padding after a record. Plain text counts
everywhere, so its labels are its ids and one code path serves both. The label at position t says
whether token t is a target predicted from the tokens before it; position 0 is never a target.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

IGNORE = -100
"""The label of a position that is not a target (PyTorch's default ``ignore_index``)."""
PAD = -1
"""Fills a record row after its tokens; its label is :data:`IGNORE`."""


@dataclass(frozen=True)
class Tokens:
    """One document's token ids and their labels, of equal length."""

    ids: list[int]
    labels: list[int]

    @classmethod
    def plain(cls, ids: Sequence[int]) -> Tokens:
        return cls(list(ids), list(ids))

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.labels):
            raise ValueError(f"{len(self.ids)} ids but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, part: slice) -> Tokens:
        return Tokens(self.ids[part], self.labels[part])

    def targets(self) -> int:
        """How many positions are next-token targets (position 0 has no token before it)."""
        return sum(label != IGNORE for label in self.labels[1:])


@dataclass(frozen=True)
class TokenRows:
    """Rows of token ids (``[n, length]``, :data:`PAD` after a record) and their labels, same shape."""

    ids: torch.Tensor
    labels: torch.Tensor

    @classmethod
    def of(cls, rows: torch.Tensor | TokenRows) -> TokenRows:
        """``rows`` itself, or id rows where every real position counts."""
        if isinstance(rows, TokenRows):
            return rows
        return cls(rows, rows.masked_fill(rows == PAD, IGNORE))

    def __post_init__(self) -> None:
        if self.ids.shape != self.labels.shape:
            raise ValueError(f"ids {list(self.ids.shape)} and labels {list(self.labels.shape)} differ in shape")

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: Any) -> TokenRows:
        """The same rows (or columns) of ids and labels; ``index`` as for a tensor."""
        return TokenRows(self.ids[index], self.labels[index])

    @property
    def shape(self) -> torch.Size:
        return self.ids.shape

    def to(self, device: torch.device | str) -> TokenRows:
        return TokenRows(self.ids.to(device), self.labels.to(device))


def target_count(labels: torch.Tensor) -> int:
    """The number of next-token targets in ``[n, length]`` labels."""
    return int((labels[:, 1:] != IGNORE).sum())
