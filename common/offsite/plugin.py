"""Plug a (federated, aggregated) adapter back into the model owner's full model."""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn

from privtune.common.errors import PrivtuneError
from privtune.common.families import family_of, get_blocks, num_blocks
from privtune.common.offsite.adapter import (
    AdapterManifest,
    base_tensors,
    in_out_features,
    linear_layers,
    lora_delta,
    resolve_parameter,
)
from privtune.common.offsite.digest import tensors_digest
from privtune.common.offsite.split import SplitIndices


def plug_in(
    full_model: nn.Module, adapter_state: Mapping[str, torch.Tensor], adapter_manifest: AdapterManifest
) -> nn.Module:
    """A copy of ``full_model`` with the adapter written into its adapter blocks.

    Full adapters replace the blocks' weights; LoRA adds B @ A * alpha/r to each adapted linear
    layer's weight. Refuses a state that does not fit the manifest, and a manifest made for another
    model: family, block count and the digest of the adapter blocks' original weights must match.
    """
    manifest = adapter_manifest
    family = family_of(full_model).name
    if manifest.family != family:
        raise PrivtuneError(f"adapter refused: it was trained for a {manifest.family} model, this is a {family} model")
    if manifest.n_blocks != num_blocks(full_model):
        raise PrivtuneError(
            f"adapter refused: it was trained for a {manifest.n_blocks}-block model, this one has "
            f"{num_blocks(full_model)}"
        )
    if manifest.mode not in ("full", "lora"):
        raise PrivtuneError(f"adapter refused: unknown adapter kind {manifest.mode!r}")
    manifest.validate_state(adapter_state)
    # Which indices are bottom and which top does not matter here; only the set of adapter blocks.
    split = SplitIndices(manifest.n_blocks, sorted(manifest.indices), [], [])
    positions = {i: i for i in range(manifest.n_blocks)}
    if any(not 0 <= i < manifest.n_blocks for i in manifest.indices):
        raise PrivtuneError(f"adapter refused: block indices {manifest.indices} are outside 0..{manifest.n_blocks - 1}")
    base = base_tensors(full_model, split, manifest.carry_embeddings)
    if tensors_digest(base) != manifest.base_hash:
        raise PrivtuneError(
            "adapter refused: the full model's weights at the adapter's blocks "
            f"{sorted(manifest.indices)} are not the ones the adapter was made from (another model or another split)"
        )
    plugged = copy.deepcopy(full_model)
    with torch.no_grad():
        if manifest.mode == "full":
            for name, tensor in adapter_state.items():
                target = resolve_parameter(plugged, positions, name)
                if target.shape != tensor.shape:
                    raise PrivtuneError(
                        f"adapter refused: {name!r} has shape {list(tensor.shape)}, model has {list(target.shape)}"
                    )
                target.copy_(tensor)
        else:
            _merge_lora(plugged, adapter_state, manifest)
    return plugged


def _merge_lora(model: nn.Module, state: Mapping[str, torch.Tensor], manifest: AdapterManifest) -> None:
    blocks = get_blocks(model)
    positions = {i: i for i in range(manifest.n_blocks)}
    for name, tensor in state.items():
        if not name.startswith("block."):
            resolve_parameter(model, positions, name).copy_(tensor)
            continue
        if not name.endswith(".lora_A"):
            continue
        stem = name.removesuffix(".lora_A")
        _, index, path = stem.split(".", 2)
        layers = linear_layers(blocks[int(index)])
        if path not in layers:
            raise PrivtuneError(f"adapter refused: block {index} has no linear layer {path!r}")
        layer = layers[path]
        lora_a, lora_b = state[stem + ".lora_A"], state[stem + ".lora_B"]
        in_features, out_features = in_out_features(layer)
        if lora_a.shape[1] != in_features or lora_b.shape[0] != out_features:
            raise PrivtuneError(
                f"adapter refused: LoRA {stem!r} maps {lora_a.shape[1]}->{lora_b.shape[0]}, "
                f"the model's layer maps {in_features}->{out_features}"
            )
        layer.weight.add_(lora_delta(layer, lora_a, lora_b, manifest.scale).to(layer.weight.dtype))
