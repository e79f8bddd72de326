"""What the model owner sends each data owner once: the emulator, the initial adapter and a manifest.

Tensors are kept in two name spaces: ``emulator/<state-dict name of the thinned model>`` (frozen:
embeddings, kept middle blocks, final norm, head) and ``adapter/<canonical name>`` (the adapter
blocks' full weights, plus embeddings when carried; see :mod:`common.offsite.adapter`). The content
hash covers every tensor's name, dtype, shape and bytes plus the manifest, so a client can cache the
package by hash and any corruption or tampering is detected on load.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from privtune.common.errors import PrivtuneError
from privtune.common.families import family_of, num_blocks
from privtune.common.offsite.adapter import (
    AdapterManifest,
    base_tensors,
    block_positions,
    describe_adapter,
    hf_name,
    prepare_adapter,
    trains_base_tensor,
)
from privtune.common.offsite.config import OffsiteConfig
from privtune.common.offsite.digest import tensors_digest
from privtune.common.offsite.split import SPLIT_ATTR, SplitIndices, build_emulator_model, split_indices, split_of
from privtune.common.paths import cache_dir

PACKAGE_FORMAT = "privtune-offsite-package/1"
TENSORS_FILE = "package.safetensors"
MANIFEST_FILE = "manifest.json"
EMULATOR_PREFIX = "emulator/"
ADAPTER_PREFIX = "adapter/"
HASH_KEY = "content_hash"
CONTENT_HASH = re.compile(r"[0-9a-f]{64}")


def _config_dict(model: nn.Module) -> dict[str, Any]:
    """The model's transformers config as plain JSON data (without the owner's local paths)."""
    data = json.loads(model.config.to_json_string(use_diff=False))  # type: ignore[union-attr, operator]
    return {k: v for k, v in data.items() if not k.startswith("_")}


def _manifest_core(manifest: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in manifest.items() if k != HASH_KEY}


class EmulatorPackage:
    """An emulator package; construct with :meth:`build`, :meth:`load` or :meth:`from_parts`."""

    def __init__(self, tensors: dict[str, torch.Tensor], manifest: dict[str, Any], origin: str = "package") -> None:
        self._tensors = tensors
        self._manifest = manifest
        self._verify(origin)

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(
        cls,
        full_model: nn.Module,
        cfg: OffsiteConfig,
        *,
        emulator: nn.Module | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> EmulatorPackage:
        """Package ``full_model`` split by ``cfg``; pass ``emulator`` to ship a distilled one.

        ``extra`` adds JSON data to the manifest (e.g. distillation settings); it is hashed too.
        """
        split = split_indices(num_blocks(full_model), cfg)
        if emulator is None:
            emulator = build_emulator_model(full_model, cfg)
        if split_of(emulator) != split:
            raise PrivtuneError(
                f"the emulator was built for split {split_of(emulator)}, not {split}; rebuild it with this config"
            )
        adapter = describe_adapter(emulator, split, cfg)
        if adapter.base_hash != describe_adapter(full_model, split, cfg).base_hash:
            raise PrivtuneError(
                "the emulator's adapter blocks differ from the full model's; only its middle may be distilled"
            )
        covered = {
            hf_name(emulator, block_positions(emulator, split), name): name
            for name in base_tensors(emulator, split, cfg.carry_embeddings)
        }
        tensors: dict[str, torch.Tensor] = {}
        aliases: dict[str, str] = {}
        first_by_storage: dict[tuple, str] = {}
        for name, tensor in emulator.state_dict().items():
            key = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()))
            if key in first_by_storage:
                aliases[name] = first_by_storage[key]
                continue
            first_by_storage[key] = name
            if name in covered:
                tensors[ADAPTER_PREFIX + covered[name]] = tensor.detach().clone().contiguous()
            else:
                tensors[EMULATOR_PREFIX + name] = tensor.detach().clone().contiguous()
        manifest: dict[str, Any] = {
            "format": PACKAGE_FORMAT,
            "family": family_of(full_model).name,
            "config": _config_dict(full_model),
            "emulator_config": _config_dict(emulator),
            "n_blocks": split.n_blocks,
            "split": split.to_dict(),
            "offsite": cfg.to_dict(),
            "dtype": adapter.dtype,
            "tensors": {name: list(t.shape) for name, t in sorted(tensors.items())},
            "aliases": aliases,
            "adapter": adapter.to_dict(),
            **(dict(extra) if extra else {}),
        }
        manifest = json.loads(json.dumps(manifest))
        manifest[HASH_KEY] = tensors_digest(tensors, manifest)
        return cls(tensors, manifest, origin="built package")

    @classmethod
    def from_parts(cls, tensors: Mapping[str, Any], manifest: Mapping[str, Any]) -> EmulatorPackage:
        """Rebuild a package that travelled as arrays + manifest (e.g. Flower records); verifies the hash."""
        return cls(
            {k: torch.as_tensor(v) for k, v in tensors.items()},
            copy.deepcopy(dict(manifest)),
            origin="received package",
        )

    @classmethod
    def load(cls, folder: Path | str) -> EmulatorPackage:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        folder = Path(folder)
        manifest_path, tensors_path = folder / MANIFEST_FILE, folder / TENSORS_FILE
        try:
            manifest = json.loads(manifest_path.read_text())
            tensors = load_file(str(tensors_path))
        except FileNotFoundError as err:
            raise PrivtuneError(
                f"{folder} is not an emulator package: {err.filename} is missing (create one with 'privtune prepare')"
            ) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise PrivtuneError(f"{manifest_path} is corrupt ({err}); fetch or prepare the package again") from None
        except (SafetensorError, OSError, ValueError) as err:
            raise PrivtuneError(f"{tensors_path} is corrupt ({err}); fetch or prepare the package again") from None
        return cls(tensors, manifest, origin=str(folder))

    def _verify(self, origin: str) -> None:
        manifest = self._manifest
        if not isinstance(manifest, dict) or manifest.get("format") != PACKAGE_FORMAT:
            raise PrivtuneError(f"{origin}: not a {PACKAGE_FORMAT} manifest")
        listed = manifest.get("tensors", {})
        actual = {name: list(t.shape) for name, t in self._tensors.items()}
        if listed != actual:
            raise PrivtuneError(f"{origin}: tensors do not match the manifest's list (corrupt or tampered package)")
        digest = tensors_digest(self._tensors, _manifest_core(manifest))
        if digest != manifest.get(HASH_KEY):
            raise PrivtuneError(
                f"{origin}: content hash mismatch (manifest says {str(manifest.get(HASH_KEY))[:16]}..., content is "
                f"{digest[:16]}...): the package is corrupt or was tampered with; fetch or prepare it again"
            )

    # ------------------------------------------------------------------ views
    @property
    def content_hash(self) -> str:
        return self._manifest[HASH_KEY]

    @property
    def manifest(self) -> dict[str, Any]:
        return copy.deepcopy(self._manifest)

    @property
    def split(self) -> SplitIndices:
        return SplitIndices.from_dict(self._manifest["split"])

    @property
    def config(self) -> OffsiteConfig:
        return OffsiteConfig.from_dict(self._manifest["offsite"])

    @property
    def adapter_manifest(self) -> AdapterManifest:
        """What every data owner's adapter update for this package must look like."""
        return AdapterManifest.of_package(self._manifest)

    def initial_adapter(self) -> dict[str, torch.Tensor]:
        """The adapter's starting full weights, canonically named (copies)."""
        return {
            k.removeprefix(ADAPTER_PREFIX): t.clone() for k, t in self._tensors.items() if k.startswith(ADAPTER_PREFIX)
        }

    def to_parts(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Tensors (shared, do not modify) and a copy of the manifest, for transport."""
        return dict(self._tensors), self.manifest

    # ------------------------------------------------------------------ persistence
    def save(self, folder: Path | str) -> Path:
        """Write ``package.safetensors`` + ``manifest.json``; the manifest is written last."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tmp_tensors, tmp_manifest = folder / f".{TENSORS_FILE}.tmp", folder / f".{MANIFEST_FILE}.tmp"
        save_file(self._tensors, str(tmp_tensors), metadata={HASH_KEY: self.content_hash})
        tmp_manifest.write_text(json.dumps(self._manifest, indent=1, sort_keys=True) + "\n")
        os.replace(tmp_tensors, folder / TENSORS_FILE)
        os.replace(tmp_manifest, folder / MANIFEST_FILE)
        return folder

    # ------------------------------------------------------------------ the data owner's model
    def instantiate(self, *, seed: int | None = None) -> nn.Module:
        """The data owner's runnable model: emulator frozen, adapter prepared (see ``prepare_adapter``).

        Frozen tensors are shared with this package, not copied (they never change): the emulator's,
        and with LoRA the adapter blocks' own weights too; only tensors the adapter trains are copies.
        Weights are not randomly initialised first, so building the model costs little more than the
        package's own memory.
        """
        from transformers import AutoModelForCausalLM
        from transformers.initialization import no_init_weights
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        manifest = self._manifest
        config_data = dict(manifest["emulator_config"])
        config = CONFIG_MAPPING[config_data["model_type"]].from_dict(config_data)
        with no_init_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, manifest["dtype"]))
        split = self.split
        positions = block_positions(model, split)
        offsite = OffsiteConfig.from_dict(manifest["offsite"])
        state = {}
        for name, tensor in self._tensors.items():
            if name.startswith(EMULATOR_PREFIX):
                state[name.removeprefix(EMULATOR_PREFIX)] = tensor
            else:
                canonical = name.removeprefix(ADAPTER_PREFIX)
                trained = trains_base_tensor(offsite, canonical)
                state[hf_name(model, positions, canonical)] = tensor.clone() if trained else tensor
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        model.tie_weights()
        aliases = manifest["aliases"]
        params = dict(model.named_parameters(remove_duplicate=False))
        broken = [a for a, target in aliases.items() if a in params and params[a] is not params[target]]
        if unexpected or set(missing) - set(aliases) or broken:
            raise PrivtuneError(
                f"package {self.content_hash[:16]}... does not fit its own config (missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]}, untied {broken[:5]}); it was made by an incompatible version"
            )
        setattr(model, SPLIT_ATTR, split)
        model.eval()
        return prepare_adapter(model, manifest, seed=seed)


def cached_folder(content_hash: str, cache_root: Path | str | None = None) -> Path:
    """Where the package with this hash lives in the cache, after proving the hash is one.

    The hash arrives from the model owner, who may not be trusted with the owner's file system: as
    a folder name it must be a sha256 hex digest, so it can name nothing but one cache entry.
    """
    if not CONTENT_HASH.fullmatch(content_hash):
        raise PrivtuneError(f"emulator hash {content_hash[:80]!r} is not a sha256 hex digest; refusing to use it")
    root = Path(cache_root) if cache_root is not None else cache_dir("emulators")
    folder = root / content_hash
    if folder.resolve().parent != root.resolve():
        raise PrivtuneError(f"{folder} leads out of the emulator cache {root} (a link?); remove it")
    return folder


def cache_package(package: EmulatorPackage, cache_root: Path | str | None = None) -> Path:
    """Store the package under ``<cache_root>/<content hash>`` (once); returns the folder."""
    target = cached_folder(package.content_hash, cache_root)
    if not (target / MANIFEST_FILE).exists():
        package.save(target)
    return target


def load_cached(content_hash: str, cache_root: Path | str | None = None) -> EmulatorPackage | None:
    """The cached package with this hash, or None if absent.

    A cached copy that fails verification is reported and removed, so the caller fetches the
    package again and caches it afresh instead of being stuck on a broken cache. Only the cache
    entry itself is ever removed (see :func:`cached_folder`).
    """
    folder = cached_folder(content_hash, cache_root)
    if not (folder / MANIFEST_FILE).exists():
        return None
    try:
        package = EmulatorPackage.load(folder)
        if package.content_hash != content_hash:
            raise PrivtuneError(f"{folder} holds package {package.content_hash}, not {content_hash}")
    except PrivtuneError as err:
        warnings.warn(f"removing broken cached emulator package: {err}", stacklevel=2)
        shutil.rmtree(folder, ignore_errors=True)
        return None
    return package
