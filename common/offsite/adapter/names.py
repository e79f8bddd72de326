"""What an adapter covers in a model, under names that do not depend on how the model is wrapped.

Adapter tensors are named canonically and by ORIGINAL block index, so the same name means the same
weight in the emulator (where block 29 may sit at position 11), in the full model and in every data
owner's update:

- full blocks: ``block.<orig>.<param path in the block>``, e.g. ``block.29.mlp.down_proj.weight``;
- LoRA: ``block.<orig>.<linear path>.lora_A`` (``[r, in]``) and ``.lora_B`` (``[out, r]``), with
  delta W = B @ A * alpha / r;
- carried embeddings (ULT mode): ``input_embeddings.weight`` and, only if the head is not tied to it,
  ``output_embeddings.weight``.

FedAvg averages these states element-wise. For LoRA that averages A and B separately, so the mean
of the products B_i A_i is only approximated by (mean B)(mean A); every owner starts each round from
the same aggregated A and B, so after few local steps the cross terms are small. This is the usual
federated-LoRA practice and is accepted here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, TypeAlias

import torch
from torch import nn

from privtune.common.errors import PrivtuneError
from privtune.common.families import blocks_prefix, get_blocks, num_blocks
from privtune.common.offsite.split import SplitIndices

INPUT_EMBEDDINGS = "input_embeddings.weight"
OUTPUT_EMBEDDINGS = "output_embeddings.weight"
BLOCK_NAME = re.compile(r"^block\.(\d+)\.(.+)$")

if TYPE_CHECKING:
    from transformers.pytorch_utils import Conv1D

LinearLayer: TypeAlias = "nn.Linear | Conv1D"


def _conv1d_type() -> type[Conv1D]:
    from transformers.pytorch_utils import Conv1D

    return Conv1D


def linear_layers(block: nn.Module) -> dict[str, LinearLayer]:
    """The linear layers of a block (``nn.Linear``, or GPT-2's transposed ``Conv1D``) by path."""
    conv1d = _conv1d_type()
    return {name: m for name, m in block.named_modules() if isinstance(m, (nn.Linear, conv1d))}


def in_out_features(layer: LinearLayer) -> tuple[int, int]:
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    in_features, out_features = layer.weight.shape  # Conv1D stores [in, out]
    return int(in_features), int(out_features)


def lora_delta(layer: LinearLayer, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """The weight update B @ A * scale in the layer's own weight layout (Conv1D is transposed).

    Computed in at least float32 (bf16/fp16 weights get an fp32 product), float64 for float64 weights.
    """
    dtype = torch.promote_types(layer.weight.dtype, torch.float32)
    delta = (lora_b.to(dtype) @ lora_a.to(dtype)) * scale
    if not isinstance(layer, nn.Linear):
        delta = delta.T
    return delta


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def tied(model: nn.Module) -> bool:
    # get_*_embeddings are transformers methods, which nn.Module.__getattr__ types as tensors
    out = model.get_output_embeddings()  # type: ignore[operator]
    return out is not None and out.weight is model.get_input_embeddings().weight  # type: ignore[operator]


def block_positions(model: nn.Module, split: SplitIndices) -> dict[int, int]:
    """Original block index -> position in ``model`` (a thinned emulator or the full model)."""
    n = num_blocks(model)
    if n == len(split.kept):
        return {orig: pos for pos, orig in enumerate(split.kept)}
    if n == split.n_blocks:
        return {i: i for i in range(n)}
    raise PrivtuneError(
        f"model has {n} blocks but the split describes a {split.n_blocks}-block model thinned to {len(split.kept)}; "
        "use the model the package or adapter was made for"
    )


def resolve_parameter(model: nn.Module, positions: Mapping[int, int], name: str) -> nn.Parameter:
    """The model parameter behind a canonical full-weight name (``block.<orig>.<path>`` or embeddings)."""
    if name == INPUT_EMBEDDINGS:
        return model.get_input_embeddings().weight  # type: ignore[operator]
    if name == OUTPUT_EMBEDDINGS:
        return model.get_output_embeddings().weight  # type: ignore[operator]
    match = BLOCK_NAME.match(name)
    if not match or int(match.group(1)) not in positions:
        raise PrivtuneError(
            f"adapter tensor {name!r} names no adapter block of this model (blocks {sorted(positions)})"
        )
    block = get_blocks(model)[positions[int(match.group(1))]]
    try:
        return block.get_parameter(match.group(2))
    except AttributeError:
        raise PrivtuneError(
            f"adapter tensor {name!r}: block {match.group(1)} has no parameter {match.group(2)!r}"
        ) from None


def hf_name(model: nn.Module, positions: Mapping[int, int], name: str) -> str:
    """State-dict name in ``model`` of a canonical full-weight name."""
    if name in (INPUT_EMBEDDINGS, OUTPUT_EMBEDDINGS):
        target = resolve_parameter(model, positions, name)
        return next(n for n, p in model.named_parameters(remove_duplicate=False) if p is target)
    match = BLOCK_NAME.match(name)
    if not match or int(match.group(1)) not in positions:
        raise PrivtuneError(f"tensor {name!r} names no block of this model")
    return f"{blocks_prefix(model)}.{positions[int(match.group(1))]}.{match.group(2)}"


def base_tensors(model: nn.Module, split: SplitIndices, carry_embeddings: bool) -> dict[str, torch.Tensor]:
    """The full weights the adapter covers (adapter blocks, carried embeddings), canonically named.

    These are the package's initial adapter, and their digest identifies the model an adapter was
    trained on, so a plug-in into any other model is refused.
    """
    positions = block_positions(model, split)
    blocks = get_blocks(model)
    tensors: dict[str, torch.Tensor] = {}
    for orig in split.adapter:
        for path, param in blocks[positions[orig]].named_parameters():
            tensors[f"block.{orig}.{path}"] = param
    if carry_embeddings:
        tensors.update(embedding_tensors(model))
    return tensors


def embedding_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's embedding weights by canonical name; the head only when it is not tied to the input."""
    tensors = {INPUT_EMBEDDINGS: model.get_input_embeddings().weight}  # type: ignore[operator]
    if not tied(model):
        tensors[OUTPUT_EMBEDDINGS] = model.get_output_embeddings().weight  # type: ignore[operator]
    return tensors
