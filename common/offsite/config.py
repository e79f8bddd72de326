"""How a foundation model is cut for offsite-tuning: adapter size, emulator size, adapter kind."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from privtune.common.errors import PrivtuneError

ADAPTER_KINDS = ("lora", "full")


@dataclass(frozen=True)
class OffsiteConfig:
    """The split the model owner chooses; travels in every package manifest.

    ``k_bottom``/``k_top`` blocks form the adapter the data owners train; the blocks between them are
    thinned to ``n_emulator`` blocks. ``adapter="lora"`` trains LoRA matrices on the adapter blocks'
    linear layers, ``"full"`` trains the blocks themselves. ``carry_embeddings`` (ULT mode, where the
    data owner's token ids mean something new) makes the input embedding and LM head part of the
    adapter as well, trained fully.
    """

    k_bottom: int = 2
    k_top: int = 2
    n_emulator: int = 8
    adapter: str = "lora"
    lora_r: int = 8
    lora_alpha: int = 16
    carry_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.adapter not in ADAPTER_KINDS:
            raise PrivtuneError(f"adapter kind must be one of {', '.join(ADAPTER_KINDS)}, got {self.adapter!r}")
        if self.k_bottom < 0 or self.k_top < 0:
            raise PrivtuneError(f"k_bottom and k_top must be >= 0, got {self.k_bottom} and {self.k_top}")
        if self.k_bottom + self.k_top == 0 and not self.carry_embeddings:
            raise PrivtuneError("the adapter is empty: set k_bottom or k_top to at least 1 (or carry_embeddings)")
        if self.adapter == "lora" and (self.lora_r < 1 or self.lora_alpha <= 0):
            raise PrivtuneError(f"LoRA needs r >= 1 and alpha > 0, got r={self.lora_r}, alpha={self.lora_alpha}")

    @property
    def lora_scale(self) -> float:
        return self.lora_alpha / self.lora_r

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OffsiteConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise PrivtuneError(f"unknown offsite config keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**dict(data))
