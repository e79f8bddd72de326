"""Putting the adapter on a model: freeze the rest, inject LoRA with peft, read and write the live state."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import torch
from torch import nn

from privtune.common.errors import PrivtuneError
from privtune.common.families import blocks_prefix, get_blocks, num_blocks
from privtune.common.offsite.adapter.manifest import AdapterManifest, describe_adapter
from privtune.common.offsite.adapter.names import (
    BLOCK_NAME,
    base_tensors,
    block_positions,
    linear_layers,
    resolve_parameter,
)
from privtune.common.offsite.config import OffsiteConfig
from privtune.common.offsite.split import SPLIT_ATTR, SplitIndices, split_indices, split_of

ADAPTER_ATTR = "offsite_adapter"
PEFT_ADAPTER_NAME = "default"


def trains_base_tensor(cfg: OffsiteConfig, name: str) -> bool:
    """Whether the adapter trains the model's own tensor ``name`` (canonical): all of them in a full
    adapter, only those outside the blocks (carried embeddings) with LoRA, whose blocks stay frozen."""
    return cfg.adapter == "full" or not BLOCK_NAME.match(name)


def prepare_adapter(model: nn.Module, spec: OffsiteConfig | Mapping[str, Any], *, seed: int | None = None) -> nn.Module:
    """Freeze everything but the adapter, in place; returns ``model`` (same object, same class).

    ``spec`` is the package manifest (then the model must hold exactly the package's weights for
    the adapter) or an :class:`OffsiteConfig` (the split is the one ``build_emulator_model``
    attached, or, for an unthinned model, ``split_indices`` of it). LoRA layers are injected in
    place with peft, only into the adapter blocks' linear layers, with B = 0 so an untrained adapter
    changes nothing. ``seed`` fixes LoRA's random A.
    """
    if isinstance(spec, OffsiteConfig):
        cfg, emulator_hash, expected = spec, "", None
        split = split_of(model) or split_indices(num_blocks(model), cfg)
        if split != split_indices(split.n_blocks, cfg):
            raise PrivtuneError(
                f"the model was thinned with split {split}, which this config does not give; use its own config"
            )
    else:
        cfg = OffsiteConfig.from_dict(spec["offsite"])
        split = SplitIndices.from_dict(spec["split"])
        emulator_hash = spec["content_hash"]
        expected = AdapterManifest.of_package(spec)
    if getattr(model, ADAPTER_ATTR, None) is not None:
        raise PrivtuneError("this model already has an adapter prepared; prepare a fresh copy")
    manifest = describe_adapter(model, split, cfg, emulator_hash)
    if expected is not None and manifest.base_hash != expected.base_hash:
        raise PrivtuneError(
            "the model's adapter blocks differ from the package's; instantiate the model from the package"
        )
    for param in model.parameters():
        param.requires_grad_(False)
    positions = block_positions(model, split)
    if cfg.adapter == "lora":
        _inject_lora(model, split, positions, cfg, seed)
    for name in base_tensors(model, split, cfg.carry_embeddings):
        if trains_base_tensor(cfg, name):
            resolve_parameter(model, positions, name).requires_grad_(True)
    setattr(model, SPLIT_ATTR, split)
    setattr(model, ADAPTER_ATTR, manifest)
    live = {name: list(t.shape) for name, t in _adapter_parameters(model).items()}
    if live != manifest.shapes:
        raise AssertionError(f"adapter shapes disagree with the derived manifest: {live} vs {manifest.shapes}")
    return model


def _inject_lora(
    model: nn.Module, split: SplitIndices, positions: Mapping[int, int], cfg: OffsiteConfig, seed: int | None
) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    blocks = get_blocks(model)
    prefix = blocks_prefix(model)
    targets, conv = [], False
    for orig in split.adapter:
        for path, layer in linear_layers(blocks[positions[orig]]).items():
            targets.append(f"{prefix}.{positions[orig]}.{path}")
            conv = conv or not isinstance(layer, nn.Linear)
    config = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=0.0,
        bias="none",
        target_modules=targets,
        fan_in_fan_out=conv,
        init_lora_weights=True,
    )
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        inject_adapter_in_model(config, model, adapter_name=PEFT_ADAPTER_NAME)


def adapter_manifest(model: nn.Module) -> AdapterManifest:
    manifest = getattr(model, ADAPTER_ATTR, None)
    if manifest is None:
        raise PrivtuneError("this model has no adapter; call prepare_adapter (or EmulatorPackage.instantiate) first")
    return manifest


def _adapter_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """The live adapter parameters under their canonical names."""
    manifest = adapter_manifest(model)
    split = split_of(model)
    if split is None:
        raise PrivtuneError("this model has an adapter but no offsite split; build it with prepare_adapter")
    positions = block_positions(model, split)
    params: dict[str, torch.Tensor] = {}
    blocks = get_blocks(model)
    for orig in split.adapter:
        block = blocks[positions[orig]]
        if manifest.mode == "full":
            params.update({f"block.{orig}.{path}": p for path, p in block.named_parameters()})
        else:
            from peft.tuners.lora import LoraLayer

            for path, layer in block.named_modules():
                if isinstance(layer, LoraLayer):
                    # peft gives the linear layers it wraps an nn.Linear per factor
                    params[f"block.{orig}.{path}.lora_A"] = cast(nn.Linear, layer.lora_A[PEFT_ADAPTER_NAME]).weight
                    params[f"block.{orig}.{path}.lora_B"] = cast(nn.Linear, layer.lora_B[PEFT_ADAPTER_NAME]).weight
    for name, tensor in base_tensors(model, split, manifest.carry_embeddings).items():
        if not BLOCK_NAME.match(name):
            params[name] = tensor
    return params


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the adapter, canonically named (see module docstring)."""
    return {name: p.detach().clone() for name, p in _adapter_parameters(model).items()}


def load_adapter_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Overwrite the model's adapter with ``state`` (e.g. the aggregate the server sent back)."""
    adapter_manifest(model).validate_state(state)
    params = _adapter_parameters(model)
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor)
