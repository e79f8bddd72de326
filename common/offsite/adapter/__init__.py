"""The trainable adapter on a data owner's model, split by role like peft's ``tuners/lora``.

``names`` (what the adapter covers, canonical tensor names), ``manifest`` (the schema every state is
checked against), ``inject`` (freezing, LoRA injection, reading and writing the live state) and
``folder`` (the peft folder on disk).
"""

from privtune.common.offsite.adapter.folder import (
    MANIFEST_FILE,
    PEFT_CONFIG_FILE,
    PEFT_WEIGHTS_FILE,
    load_adapter,
    peft_config,
    save_adapter,
)
from privtune.common.offsite.adapter.inject import (
    adapter_manifest,
    adapter_state,
    load_adapter_state,
    prepare_adapter,
    trains_base_tensor,
)
from privtune.common.offsite.adapter.manifest import ADAPTER_FORMAT, AdapterManifest, describe_adapter
from privtune.common.offsite.adapter.names import (
    INPUT_EMBEDDINGS,
    OUTPUT_EMBEDDINGS,
    base_tensors,
    block_positions,
    embedding_tensors,
    hf_name,
    in_out_features,
    linear_layers,
    lora_delta,
    resolve_parameter,
)

__all__ = [
    "ADAPTER_FORMAT",
    "INPUT_EMBEDDINGS",
    "MANIFEST_FILE",
    "OUTPUT_EMBEDDINGS",
    "PEFT_CONFIG_FILE",
    "PEFT_WEIGHTS_FILE",
    "AdapterManifest",
    "adapter_manifest",
    "adapter_state",
    "base_tensors",
    "block_positions",
    "describe_adapter",
    "embedding_tensors",
    "hf_name",
    "in_out_features",
    "linear_layers",
    "load_adapter",
    "load_adapter_state",
    "lora_delta",
    "peft_config",
    "prepare_adapter",
    "resolve_parameter",
    "save_adapter",
    "trains_base_tensor",
]
