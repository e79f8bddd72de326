"""The adapter manifest: what an adapter state must look like, checked wherever a state arrives."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from privtune.common.errors import PrivtuneError
from privtune.common.families import family_of, get_blocks
from privtune.common.offsite.adapter.names import (
    BLOCK_NAME,
    base_tensors,
    block_positions,
    dtype_name,
    in_out_features,
    linear_layers,
    tied,
)
from privtune.common.offsite.config import OffsiteConfig
from privtune.common.offsite.digest import tensors_digest
from privtune.common.offsite.split import SplitIndices

ADAPTER_FORMAT = "privtune-offsite-adapter/1"


@dataclass(frozen=True)
class AdapterManifest:
    """What an adapter state must look like; travels with every update and is checked on arrival."""

    family: str
    n_blocks: int
    indices: list[int]
    mode: str
    lora_r: int
    lora_alpha: int
    carry_embeddings: bool
    tied_embeddings: bool
    shapes: dict[str, list[int]]
    dtype: str
    emulator_hash: str
    base_hash: str
    format: str = field(default=ADAPTER_FORMAT)

    @property
    def scale(self) -> float:
        return self.lora_alpha / self.lora_r

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AdapterManifest:
        if data.get("format") != ADAPTER_FORMAT:
            raise PrivtuneError(f"adapter manifest format {data.get('format')!r} is not {ADAPTER_FORMAT!r}")
        try:
            return cls(**{k: data[k] for k in cls.__dataclass_fields__})
        except KeyError as err:
            raise PrivtuneError(f"adapter manifest lacks field {err.args[0]!r}") from None

    @classmethod
    def of_package(cls, package_manifest: Mapping[str, Any]) -> AdapterManifest:
        """The adapter a package's data owners must send back (its hash is the package's own)."""
        return replace(cls.from_dict(package_manifest["adapter"]), emulator_hash=package_manifest["content_hash"])

    def validate_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Refuse a state whose names, shapes, dtype or values do not fit this manifest."""
        missing = sorted(set(self.shapes) - set(state))
        extra = sorted(set(state) - set(self.shapes))
        if missing or extra:
            raise PrivtuneError(
                f"adapter state does not match its manifest: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}"
            )
        for name, tensor in state.items():
            if list(tensor.shape) != list(self.shapes[name]):
                raise PrivtuneError(
                    f"adapter tensor {name!r} has shape {list(tensor.shape)}, expected {self.shapes[name]}"
                )
            if dtype_name(tensor.dtype) != self.dtype:
                raise PrivtuneError(
                    f"adapter tensor {name!r} has dtype {dtype_name(tensor.dtype)}, expected {self.dtype}"
                )
            if not torch.isfinite(tensor).all():
                raise PrivtuneError(f"adapter tensor {name!r} holds NaN or infinite values; the update is refused")

    def validate_against(
        self, reference: AdapterManifest | Mapping[str, Any], state: Mapping[str, torch.Tensor]
    ) -> None:
        """Refuse an update (this manifest + ``state``) that does not belong to ``reference``.

        ``reference`` is what the receiver issued: its :class:`AdapterManifest` (e.g.
        ``EmulatorPackage.adapter_manifest``) or the package manifest dict. Checks family, block
        indices, adapter kind, emulator hash, dtype and, tensor by tensor, names and shapes.
        """
        if not isinstance(reference, AdapterManifest):
            reference = AdapterManifest.of_package(reference)
        checks = [
            ("model family", self.family, reference.family),
            ("number of blocks of the full model", self.n_blocks, reference.n_blocks),
            ("adapter block indices", list(self.indices), list(reference.indices)),
            (
                "adapter kind",
                (self.mode, self.lora_r, self.lora_alpha, self.carry_embeddings),
                (reference.mode, reference.lora_r, reference.lora_alpha, reference.carry_embeddings),
            ),
            ("dtype", self.dtype, reference.dtype),
            ("emulator hash", self.emulator_hash, reference.emulator_hash),
            ("base model hash", self.base_hash, reference.base_hash),
            ("tensor shapes", self.shapes, reference.shapes),
        ]
        for what, got, expected in checks:
            if got != expected:
                raise PrivtuneError(f"adapter refused: {what} is {_short(got)}, expected {_short(expected)}")
        self.validate_state(state)


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    return text if len(text) <= 160 else text[:157] + "..."


def describe_adapter(
    model: nn.Module, split: SplitIndices, cfg: OffsiteConfig, emulator_hash: str = ""
) -> AdapterManifest:
    """The manifest of the (untrained) adapter for ``model`` under ``split``, derived from its modules."""
    positions = block_positions(model, split)
    base = base_tensors(model, split, cfg.carry_embeddings)
    shapes: dict[str, list[int]] = {}
    if cfg.adapter == "full":
        shapes.update({name: list(t.shape) for name, t in base.items()})
    else:
        blocks = get_blocks(model)
        for orig in split.adapter:
            for path, layer in linear_layers(blocks[positions[orig]]).items():
                in_features, out_features = in_out_features(layer)
                shapes[f"block.{orig}.{path}.lora_A"] = [cfg.lora_r, in_features]
                shapes[f"block.{orig}.{path}.lora_B"] = [out_features, cfg.lora_r]
        shapes.update({name: list(t.shape) for name, t in base.items() if not BLOCK_NAME.match(name)})
    return AdapterManifest(
        family=family_of(model).name,
        n_blocks=split.n_blocks,
        indices=list(split.adapter),
        mode=cfg.adapter,
        lora_r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        carry_embeddings=cfg.carry_embeddings,
        tied_embeddings=tied(model),
        shapes=shapes,
        dtype=dtype_name(next(iter(base.values())).dtype),
        emulator_hash=emulator_hash,
        base_hash=tensors_digest(base),
    )
