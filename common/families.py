"""The one place that knows where each model family keeps its transformer blocks, and what sits around them.

Offsite-tuning, plug-in, the PMixED ensemble and DP-SGD all need to find, cut and reassemble a
causal LM's block stack. Doing that through this module keeps the family-specific attribute paths
in one table instead of scattered ``if model_type == ...`` branches. A :class:`Stem` per family
says how positions enter the blocks (GPT-2 and OPT add learned position embeddings, LLaMA rotates
q/k inside them) and what sits between the last block and the head (OPT's optional final norm and
projection), for code that runs the blocks itself (the PMixED ensemble).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from privtune.common.errors import PrivtuneError


@dataclass(frozen=True)
class Family:
    """Where a family's parts live, as dotted attribute paths from the ``*ForCausalLM`` module."""

    name: str
    model_types: tuple[str, ...]
    blocks: str
    final_norm: str
    num_layers_key: str
    input_embeddings: str
    output_embeddings: str
    transposed_linear: bool
    """GPT-2's ``Conv1D`` stores linear weights as ``[in, out]`` (peft's ``fan_in_fan_out``)."""


FAMILIES: tuple[Family, ...] = (
    Family("gpt2", ("gpt2",), "transformer.h", "transformer.ln_f", "n_layer", "transformer.wte", "lm_head", True),
    Family(
        "llama",
        ("llama", "mistral", "qwen2"),
        "model.layers",
        "model.norm",
        "num_hidden_layers",
        "model.embed_tokens",
        "lm_head",
        False,
    ),
    Family(
        "opt",
        ("opt",),
        "model.decoder.layers",
        "model.decoder.final_layer_norm",
        "num_hidden_layers",
        "model.decoder.embed_tokens",
        "lm_head",
        False,
    ),
)


def family_by_name(name: str) -> Family:
    for family in FAMILIES:
        if family.name == name:
            return family
    raise PrivtuneError(f"unknown model family {name!r}; known: {', '.join(f.name for f in FAMILIES)}")


def family_of(model: nn.Module) -> Family:
    """The family of a transformers causal LM, from its config's ``model_type``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    known = ", ".join(t for f in FAMILIES for t in f.model_types)
    raise PrivtuneError(
        f"model type {model_type!r} is not supported (supported: {known}); use a GPT-2, LLaMA-style or OPT causal LM"
    )


def _resolve(model: nn.Module, dotted: str) -> nn.Module:
    module = model
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


def get_blocks(model: nn.Module) -> nn.ModuleList:
    path = family_of(model).blocks
    blocks = _resolve(model, path)
    if not isinstance(blocks, nn.ModuleList):
        raise PrivtuneError(f"{path} of this model is a {type(blocks).__name__}, not a list of transformer blocks")
    return blocks


def get_final_norm(model: nn.Module) -> nn.Module:
    return _resolve(model, family_of(model).final_norm)


def blocks_prefix(model: nn.Module) -> str:
    """State-dict prefix of block ``i`` is ``f"{blocks_prefix(model)}.{i}."``."""
    return family_of(model).blocks


def num_blocks(model: nn.Module) -> int:
    return len(get_blocks(model))


def set_blocks(model: nn.Module, blocks: list[nn.Module], source_indices: list[int] | None = None) -> None:
    """Replace the model's block stack and keep config and KV-cache indices consistent.

    Blocks carry a ``layer_idx`` used to address the KV cache; after dropping or reordering blocks
    those must be renumbered 0..n-1, or generation with a cache reads the wrong layer's keys.
    ``source_indices`` (the blocks' positions in the original stack) keeps per-layer config such as
    ``layer_types`` aligned with the blocks that remain.
    """
    family = family_of(model)
    parent_path, _, attr = family.blocks.rpartition(".")
    setattr(_resolve(model, parent_path), attr, nn.ModuleList(blocks))
    config: Any = model.config
    setattr(config, family.num_layers_key, len(blocks))
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and layer_types:
        if source_indices is None:
            if len(set(layer_types)) > 1:
                raise PrivtuneError("mixed layer types: pass source_indices when replacing blocks")
            source_indices = [0] * len(blocks)
        config.layer_types = [layer_types[i] for i in source_indices]
    for new_idx, block in enumerate(blocks):
        for sub in block.modules():
            if hasattr(sub, "layer_idx"):
                sub.layer_idx = new_idx  # type: ignore[assignment]  # torch types Module attributes as tensors


class Stem:
    """A loaded model's parts around its blocks: embeddings with positions in, per-token block arguments, head out."""

    def __init__(self, model: nn.Module) -> None:
        # reached through each family's own attribute paths, which nn.Module's stubs cannot express
        self.model: Any = model
        config = model.config
        self.max_positions = int(
            getattr(config, "max_position_embeddings", 0) or getattr(config, "n_positions", 0) or 0
        )

    def embed(self, token_embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Block input from the token embeddings (each row's own embedding table was applied already)."""
        return token_embeds

    def block_kwargs(self, hidden: torch.Tensor, positions: torch.Tensor) -> dict[str, tuple[torch.Tensor, ...]]:
        """Per-token tensors every block needs (sliced along dim 1 for a subset of rows)."""
        return {}

    def logits(self, last_hidden: torch.Tensor, head: nn.Module) -> torch.Tensor:
        return head(get_final_norm(self.model)(last_hidden))


class _Gpt2Stem(Stem):
    def embed(self, token_embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return token_embeds + self.model.transformer.wpe(positions)


class _LlamaStem(Stem):
    def block_kwargs(self, hidden: torch.Tensor, positions: torch.Tensor) -> dict[str, tuple[torch.Tensor, ...]]:
        return {"position_embeddings": self.model.model.rotary_emb(hidden, position_ids=positions)}


class _OptStem(Stem):
    def embed(self, token_embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        decoder = self.model.model.decoder
        hidden = token_embeds if decoder.project_in is None else decoder.project_in(token_embeds)
        return hidden + decoder.embed_positions(None, 0, position_ids=positions)

    def logits(self, last_hidden: torch.Tensor, head: nn.Module) -> torch.Tensor:
        decoder = self.model.model.decoder
        hidden = last_hidden if decoder.final_layer_norm is None else decoder.final_layer_norm(last_hidden)
        return head(hidden if decoder.project_out is None else decoder.project_out(hidden))


_STEMS: dict[str, type[Stem]] = {"gpt2": _Gpt2Stem, "llama": _LlamaStem, "opt": _OptStem}


def stem_of(model: nn.Module) -> Stem:
    return _STEMS[family_of(model).name](model)
