"""The trainable adapter on a data owner's model, under names that do not depend on how it is wrapped.

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

import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from privtune.common.errors import PrivtuneError
from privtune.common.families import blocks_prefix, family_of, get_blocks, num_blocks
from privtune.common.offsite.config import OffsiteConfig
from privtune.common.offsite.digest import tensors_digest
from privtune.common.offsite.split import SPLIT_ATTR, SplitIndices, split_indices, split_of

ADAPTER_FORMAT = "privtune-offsite-adapter/1"
ADAPTER_ATTR = "offsite_adapter"
PEFT_ADAPTER_NAME = "default"
INPUT_EMBEDDINGS = "input_embeddings.weight"
OUTPUT_EMBEDDINGS = "output_embeddings.weight"
ADAPTER_FILE = "adapter.safetensors"
ADAPTER_MANIFEST_FILE = "adapter.json"
_BLOCK_NAME = re.compile(r"^block\.(\d+)\.(.+)$")


def _conv1d_type() -> type:
    from transformers.pytorch_utils import Conv1D

    return Conv1D


def linear_layers(block: nn.Module) -> dict[str, nn.Module]:
    """The linear layers of a block (``nn.Linear``, or GPT-2's transposed ``Conv1D``) by path."""
    conv1d = _conv1d_type()
    return {name: m for name, m in block.named_modules() if isinstance(m, (nn.Linear, conv1d))}


def in_out_features(layer: nn.Module) -> tuple[int, int]:
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    in_features, out_features = layer.weight.shape  # Conv1D stores [in, out]
    return int(in_features), int(out_features)


def lora_delta(layer: nn.Module, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """The weight update B @ A * scale in the layer's own weight layout (Conv1D is transposed).

    Computed in at least float32 (bf16/fp16 weights get an fp32 product), float64 for float64 weights.
    """
    dtype = torch.promote_types(layer.weight.dtype, torch.float32)
    delta = (lora_b.to(dtype) @ lora_a.to(dtype)) * scale
    if not isinstance(layer, nn.Linear):
        delta = delta.T
    return delta


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _tied(model: nn.Module) -> bool:
    out = model.get_output_embeddings()
    return out is not None and out.weight is model.get_input_embeddings().weight


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
        return model.get_input_embeddings().weight
    if name == OUTPUT_EMBEDDINGS:
        return model.get_output_embeddings().weight
    match = _BLOCK_NAME.match(name)
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
    match = _BLOCK_NAME.match(name)
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
    tensors = {}
    for orig in split.adapter:
        for path, param in blocks[positions[orig]].named_parameters():
            tensors[f"block.{orig}.{path}"] = param
    if carry_embeddings:
        tensors.update(embedding_tensors(model))
    return tensors


def embedding_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's embedding weights by canonical name; the head only when it is not tied to the input."""
    tensors = {INPUT_EMBEDDINGS: model.get_input_embeddings().weight}
    if not _tied(model):
        tensors[OUTPUT_EMBEDDINGS] = model.get_output_embeddings().weight
    return tensors


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
            if _dtype_name(tensor.dtype) != self.dtype:
                raise PrivtuneError(
                    f"adapter tensor {name!r} has dtype {_dtype_name(tensor.dtype)}, expected {self.dtype}"
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
        shapes.update({name: list(t.shape) for name, t in base.items() if not _BLOCK_NAME.match(name)})
    return AdapterManifest(
        family=family_of(model).name,
        n_blocks=split.n_blocks,
        indices=list(split.adapter),
        mode=cfg.adapter,
        lora_r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        carry_embeddings=cfg.carry_embeddings,
        tied_embeddings=_tied(model),
        shapes=shapes,
        dtype=_dtype_name(next(iter(base.values())).dtype),
        emulator_hash=emulator_hash,
        base_hash=tensors_digest(base),
    )


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
        if cfg.adapter == "full" or not _BLOCK_NAME.match(name):
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


def _adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The live adapter parameters under their canonical names."""
    manifest = adapter_manifest(model)
    split = split_of(model)
    positions = block_positions(model, split)
    params: dict[str, nn.Parameter] = {}
    blocks = get_blocks(model)
    for orig in split.adapter:
        block = blocks[positions[orig]]
        if manifest.mode == "full":
            params.update({f"block.{orig}.{path}": p for path, p in block.named_parameters()})
        else:
            from peft.tuners.lora import LoraLayer

            for path, layer in block.named_modules():
                if isinstance(layer, LoraLayer):
                    params[f"block.{orig}.{path}.lora_A"] = layer.lora_A[PEFT_ADAPTER_NAME].weight
                    params[f"block.{orig}.{path}.lora_B"] = layer.lora_B[PEFT_ADAPTER_NAME].weight
    for name, tensor in base_tensors(model, split, manifest.carry_embeddings).items():
        if not _BLOCK_NAME.match(name):
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


def save_adapter(folder: Path | str, state: Mapping[str, torch.Tensor], manifest: AdapterManifest) -> Path:
    """Write an adapter as ``adapter.safetensors`` + ``adapter.json`` into ``folder``."""
    from safetensors.torch import save_file

    manifest.validate_state(state)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(folder / ADAPTER_FILE))
    (folder / ADAPTER_MANIFEST_FILE).write_text(json.dumps(manifest.to_dict(), indent=1, sort_keys=True) + "\n")
    return folder


def load_adapter(folder: Path | str) -> tuple[dict[str, torch.Tensor], AdapterManifest]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        manifest = AdapterManifest.from_dict(json.loads((folder / ADAPTER_MANIFEST_FILE).read_text()))
        state = load_file(str(folder / ADAPTER_FILE))
    except FileNotFoundError as err:
        raise PrivtuneError(f"{folder} is not a saved adapter: {err.filename} is missing") from None
    except (json.JSONDecodeError, SafetensorError, TypeError) as err:
        raise PrivtuneError(f"adapter in {folder} is corrupt ({err}); save it again") from None
    manifest.validate_state(state)
    return state, manifest
