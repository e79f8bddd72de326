"""Offsite-tuning: the model owner ships an emulator + adapter, data owners train the adapter, the owner plugs it in.

Modules: ``config`` (the split), ``split`` (block indices, emulator model), ``package`` (what travels,
hash-verified), ``adapter`` (trainable part: canonical names, manifest, injection, the peft folder
on disk), ``plugin`` (back into the full model), ``train`` / ``distill`` / ``evaluate`` (loops and
the perplexity table).
"""

from privtune.common.offsite.adapter import (
    AdapterManifest,
    adapter_manifest,
    adapter_state,
    load_adapter,
    load_adapter_state,
    prepare_adapter,
    save_adapter,
)
from privtune.common.offsite.config import OffsiteConfig
from privtune.common.offsite.distill import DistillConfig, DistillResult, distill_emulator, middle_kd
from privtune.common.offsite.evaluate import evaluation_table, perplexity
from privtune.common.offsite.package import EmulatorPackage, cache_package, load_cached
from privtune.common.offsite.plugin import plug_in
from privtune.common.offsite.split import SplitIndices, build_emulator_model, split_indices
from privtune.common.offsite.train import TrainConfig, TrainResult, train_adapter

__all__ = [
    "AdapterManifest",
    "DistillConfig",
    "DistillResult",
    "EmulatorPackage",
    "OffsiteConfig",
    "SplitIndices",
    "TrainConfig",
    "TrainResult",
    "adapter_manifest",
    "adapter_state",
    "build_emulator_model",
    "cache_package",
    "distill_emulator",
    "evaluation_table",
    "load_adapter",
    "load_adapter_state",
    "load_cached",
    "middle_kd",
    "perplexity",
    "plug_in",
    "prepare_adapter",
    "save_adapter",
    "split_indices",
    "train_adapter",
]
