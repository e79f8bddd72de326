"""An adapter on disk: a peft folder that loads onto the FULL model, with privtune's manifest beside it.

One layout for every adapter privtune writes (a run's aggregate and owners' adapters, ``privtune
export --peft``, tests) and reads (``privtune evaluate --adapter``, ``privtune serve --adapters``)::

    adapter_config.json         peft config: block paths and indices of the full model
    adapter_model.safetensors   peft tensor names
    manifest.json               privtune's AdapterManifest (canonical names, shapes, hashes)

so ``peft.PeftModel.from_pretrained(full_model, folder)`` gives the model that privtune's own
plug-in gives. How each adapter kind is expressed for peft:

- LoRA: a ``LoraConfig`` on the adapter blocks' linear layers; carried embeddings are
  ``modules_to_save``.
- Full blocks: peft's ``LN_TUNING`` method, which swaps each target module for a trained copy of
  it. Its targets are every parameterised layer of the adapter blocks (linear layers and norms)
  and the carried embeddings, so peft runs exactly the trained weights; nothing is approximated.
- A head tied to carried embeddings: peft wraps the two modules separately, so the folder holds
  the head as well, with the embedding's values (checked equal when read).

Folders in privtune's earlier layout (``adapter.safetensors`` beside ``manifest.json`` or
``adapter.json``, no peft files) are refused with a message saying how to write them again; they
are not read.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from enum import Enum
from pathlib import Path
from typing import Any

import torch

from privtune.common.errors import PrivtuneError
from privtune.common.families import family_by_name
from privtune.common.offsite.adapter.manifest import AdapterManifest
from privtune.common.offsite.adapter.names import BLOCK_NAME, INPUT_EMBEDDINGS, OUTPUT_EMBEDDINGS

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
MANIFEST_FILE = "manifest.json"
LEGACY_WEIGHTS_FILE = "adapter.safetensors"
PEFT_PREFIX = "base_model.model."
_CHECKED_CONFIG_KEYS = ("peft_type", "r", "lora_alpha", "target_modules", "modules_to_save", "fan_in_fan_out")


def _module_and_tensor(manifest: AdapterManifest, name: str) -> tuple[str, str]:
    """Module path in the full model and tensor name within it, of a canonical adapter name."""
    family = family_by_name(manifest.family)
    if name == INPUT_EMBEDDINGS:
        return family.input_embeddings, "weight"
    if name == OUTPUT_EMBEDDINGS:
        return family.output_embeddings, "weight"
    match = BLOCK_NAME.match(name)
    if match is None:
        raise PrivtuneError(f"adapter tensor {name!r} is neither a block tensor nor an embedding")
    index, path = match.groups()
    if manifest.mode == "lora":
        layer, factor = path.rsplit(".", 1)
        return f"{family.blocks}.{index}.{layer}", f"{factor}.weight"
    layer, param = path.rsplit(".", 1)
    return f"{family.blocks}.{index}.{layer}", param


def _peft_key(manifest: AdapterManifest, name: str) -> str:
    module, tensor = _module_and_tensor(manifest, name)
    wrapper = "ln_tuning_layers." if manifest.mode == "full" else ""
    return f"{PEFT_PREFIX}{module}.{wrapper}{tensor}"


def peft_keys(manifest: AdapterManifest) -> dict[str, str]:
    """peft's tensor name of every canonical adapter name."""
    return {name: _peft_key(manifest, name) for name in manifest.shapes}


def _tied_head_key(manifest: AdapterManifest) -> str | None:
    """peft's name for the head's copy of tied, carried embeddings (None when there is none)."""
    if not (manifest.carry_embeddings and manifest.tied_embeddings):
        return None
    return _peft_key(manifest, OUTPUT_EMBEDDINGS)


def peft_config(manifest: AdapterManifest, base_model: str | None = None) -> Any:
    """The peft config under which ``PeftModel.from_pretrained`` rebuilds this adapter on the full model."""
    from peft import LNTuningConfig, LoraConfig

    family = family_by_name(manifest.family)
    blocks = sorted({_module_and_tensor(manifest, name)[0] for name in manifest.shapes if BLOCK_NAME.match(name)})
    embeddings = [family.input_embeddings, family.output_embeddings] if manifest.carry_embeddings else []
    common: dict[str, Any] = {"task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "inference_mode": True}
    if manifest.mode == "full":
        return LNTuningConfig(target_modules=blocks + embeddings, **common)
    return LoraConfig(
        r=manifest.lora_r,
        lora_alpha=manifest.lora_alpha,
        lora_dropout=0.0,
        bias="none",
        target_modules=blocks,
        modules_to_save=embeddings or None,
        fan_in_fan_out=family.transposed_linear,
        **common,
    )


def save_adapter(
    folder: Path | str,
    state: Mapping[str, torch.Tensor],
    manifest: AdapterManifest,
    base_model: str | None = None,
) -> Path:
    """Write ``state`` as a peft folder with the manifest beside it (see module docstring).

    ``base_model`` (a Hugging Face folder or hub id) becomes peft's ``base_model_name_or_path``.
    """
    from safetensors.torch import save_file

    manifest.validate_state(state)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {key: state[name].detach().cpu().contiguous() for name, key in peft_keys(manifest).items()}
    head = _tied_head_key(manifest)
    if head is not None:
        tensors[head] = state[INPUT_EMBEDDINGS].detach().cpu().clone()
    save_file(tensors, str(folder / PEFT_WEIGHTS_FILE))
    peft_config(manifest, base_model).save_pretrained(str(folder))
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest.to_dict(), indent=1, sort_keys=True) + "\n")
    return folder


def load_adapter(folder: Path | str) -> tuple[dict[str, torch.Tensor], AdapterManifest]:
    """The canonical state and manifest of an adapter folder; refuses one whose parts disagree."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    if (folder / LEGACY_WEIGHTS_FILE).exists() and not (folder / PEFT_WEIGHTS_FILE).exists():
        raise PrivtuneError(
            f"{folder} is an adapter in privtune's earlier layout ({LEGACY_WEIGHTS_FILE} + a manifest); "
            f"privtune now reads peft folders ({PEFT_CONFIG_FILE} + {PEFT_WEIGHTS_FILE} + {MANIFEST_FILE}): "
            "write it again with privtune.common.offsite.save_adapter(folder, state, manifest), or rerun the "
            "federation that made it"
        )
    try:
        manifest = AdapterManifest.from_dict(json.loads((folder / MANIFEST_FILE).read_text()))
        config = json.loads((folder / PEFT_CONFIG_FILE).read_text())
        tensors = load_file(str(folder / PEFT_WEIGHTS_FILE))
    except FileNotFoundError as err:
        raise PrivtuneError(f"{folder} is not a saved adapter: {err.filename} is missing") from None
    except (json.JSONDecodeError, SafetensorError, TypeError) as err:
        raise PrivtuneError(f"adapter in {folder} is corrupt ({err}); save it again") from None
    _check_config(folder, config, manifest)
    keys = peft_keys(manifest)
    head = _tied_head_key(manifest)
    expected = set(keys.values()) | ({head} if head else set())
    if set(tensors) != expected:
        unexpected, missing = sorted(set(tensors) - expected), sorted(expected - set(tensors))
        raise PrivtuneError(
            f"{folder / PEFT_WEIGHTS_FILE} does not hold the tensors its manifest names: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}; save the adapter again"
        )
    state = {name: tensors[key] for name, key in keys.items()}
    if head is not None and not torch.equal(tensors[head], state[INPUT_EMBEDDINGS]):
        raise PrivtuneError(f"{folder}: the tied head's copy differs from the input embeddings; save the adapter again")
    manifest.validate_state(state)
    return state, manifest


def _check_config(folder: Path, config: Mapping[str, Any], manifest: AdapterManifest) -> None:
    """peft and privtune must read the same adapter: the peft config must be the one the manifest gives."""
    expected = peft_config(manifest).to_dict()
    for key in _CHECKED_CONFIG_KEYS:
        got, want = _comparable(config.get(key)), _comparable(expected.get(key))
        if got != want:
            raise PrivtuneError(
                f"{folder / PEFT_CONFIG_FILE}: {key} is {got!r}, but the adapter's manifest gives {want!r}; "
                "save the adapter again"
            )


def _comparable(value: Any) -> Any:
    if isinstance(value, (list, set, tuple)):
        return sorted(value)
    return value.value if isinstance(value, Enum) else value
