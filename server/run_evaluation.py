"""The perplexity table of a finished run, on the same held-out ids for every model.

zero-shot full model | emulator alone | emulator + trained adapter | plug-in (full model + adapter).
In ULT mode the ids are in the federation key's code space, so only a key holder can evaluate the
zero-shot model and the untrained emulator: their public embedding rows must first be moved into
the key's order (``rows``, from :func:`common.ult.keys.permuted_rows`). After training, the
aggregate already carries keyed rows.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from common.offsite.adapter import INPUT_EMBEDDINGS, OUTPUT_EMBEDDINGS, adapter_state, load_adapter_state
from common.offsite.evaluate import evaluation_table
from common.offsite.package import EmulatorPackage
from common.offsite.plugin import plug_in


def keyed_copy(model: nn.Module, rows: torch.Tensor | None) -> nn.Module:
    """A copy whose input (and untied output) embedding rows are reordered by ``rows``."""
    model = copy.deepcopy(model)
    if rows is not None:
        with torch.no_grad():
            embedding = model.get_input_embeddings().weight
            embedding.copy_(embedding[rows])
            head = model.get_output_embeddings().weight
            if head.data_ptr() != embedding.data_ptr():
                head.copy_(head[rows])
    return model


def keyed_state(state: dict[str, torch.Tensor], rows: torch.Tensor | None) -> dict[str, torch.Tensor]:
    if rows is None:
        return state
    return {k: (v[rows].clone() if k in (INPUT_EMBEDDINGS, OUTPUT_EMBEDDINGS) else v) for k, v in state.items()}


def evaluate_run(run_dir: Path, full_model: nn.Module, eval_blocks: torch.Tensor, seed: int,
                 rows: torch.Tensor | None = None, title: str = "perplexity on the owners' held-out text") -> dict[str, float | None]:
    package = EmulatorPackage.load(run_dir / "emulator")
    final = load_file(str(run_dir / "adapters" / "aggregate" / "adapter.safetensors"))
    emulator = package.instantiate(seed=seed)
    load_adapter_state(emulator, keyed_state(adapter_state(emulator), rows))
    tuned = package.instantiate(seed=seed)
    load_adapter_state(tuned, final)
    return evaluation_table(eval_blocks, full_model=keyed_copy(full_model, rows), emulator=emulator,
                            emulator_adapter=tuned, plugin=plug_in(full_model, final, package.adapter_manifest),
                            title=title)
