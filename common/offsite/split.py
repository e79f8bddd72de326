"""Which blocks go where: adapter (bottom + top), emulator (uniformly thinned middle).

Only the middle is thinned; the original code's evaluation dropped layers across the whole stack,
which silently removed adapter blocks too.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from torch import nn

from privtune.common.errors import PrivtuneError
from privtune.common.families import get_blocks, num_blocks, set_blocks
from privtune.common.offsite.config import OffsiteConfig

SPLIT_ATTR = "offsite_split"
"""Attribute on a thinned model holding its :class:`SplitIndices` (block position -> original index)."""


@dataclass(frozen=True)
class SplitIndices:
    """Indices into the ORIGINAL block stack of ``n_blocks`` blocks."""

    n_blocks: int
    bottom: list[int]
    middle_kept: list[int]
    top: list[int]

    @property
    def adapter(self) -> list[int]:
        return self.bottom + self.top

    @property
    def kept(self) -> list[int]:
        """Original index of each block of the emulator model, in order."""
        return self.bottom + self.middle_kept + self.top

    def to_dict(self) -> dict[str, object]:
        return {"n_blocks": self.n_blocks, "bottom": self.bottom, "middle_kept": self.middle_kept, "top": self.top}

    @classmethod
    def from_dict(cls, data: dict) -> SplitIndices:
        return cls(int(data["n_blocks"]), list(data["bottom"]), list(data["middle_kept"]), list(data["top"]))


def uniform_keep(n: int, m: int) -> list[int]:
    """Positions ``round(i*(n-1)/(m-1))``, i = 0..m-1, of ``n`` items (halves round up; exact integers).

    ``m == 1`` keeps the first item.
    """
    if m == 1:
        return [0]
    return [(2 * i * (n - 1) + (m - 1)) // (2 * (m - 1)) for i in range(m)]


def split_indices(n_blocks: int, cfg: OffsiteConfig) -> SplitIndices:
    n_middle = n_blocks - cfg.k_bottom - cfg.k_top
    if n_middle < 1:
        raise PrivtuneError(
            f"k_bottom={cfg.k_bottom} + k_top={cfg.k_top} leaves no middle block of a {n_blocks}-block model; "
            f"use k_bottom + k_top <= {n_blocks - 1}"
        )
    if not 1 <= cfg.n_emulator <= n_middle:
        raise PrivtuneError(
            f"n_emulator={cfg.n_emulator} is out of range: the {n_blocks}-block model has {n_middle} middle blocks "
            f"with k_bottom={cfg.k_bottom}, k_top={cfg.k_top}; choose 1..{n_middle}"
        )
    start = cfg.k_bottom
    return SplitIndices(
        n_blocks=n_blocks,
        bottom=list(range(cfg.k_bottom)),
        middle_kept=[start + p for p in uniform_keep(n_middle, cfg.n_emulator)],
        top=list(range(n_blocks - cfg.k_top, n_blocks)),
    )


def build_emulator_model(full_model: nn.Module, cfg: OffsiteConfig) -> nn.Module:
    """A runnable copy of ``full_model`` holding only the kept blocks (adapter + thinned middle).

    Dropped blocks are never copied (pre-seeding deepcopy's memo keeps them out), so building an
    emulator of a large model costs the emulator's memory, not the full model's.
    """
    blocks = get_blocks(full_model)
    split = split_indices(num_blocks(full_model), cfg)
    kept = set(split.kept)
    memo = {id(block): None for i, block in enumerate(blocks) if i not in kept}
    emulator = copy.deepcopy(full_model, memo)
    copied = get_blocks(emulator)
    set_blocks(emulator, [copied[i] for i in split.kept], source_indices=split.kept)
    setattr(emulator, SPLIT_ATTR, split)
    return emulator


def split_of(model: nn.Module) -> SplitIndices | None:
    return getattr(model, SPLIT_ATTR, None)
