"""The perplexity table of a finished run, on the same held-out ids for every model.

zero-shot full model | emulator alone | emulator + trained adapter | plug-in (full model + adapter).
In ULT mode the ids are in the federation key's code space, so only a key holder can evaluate the
zero-shot model and the untrained emulator: their public embedding rows must first be moved into
the key's order (``rows``, see :mod:`common.ult.relabel`). After training, the
aggregate already carries keyed rows.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from privtune.common.offsite.adapter import adapter_state, load_adapter, load_adapter_state
from privtune.common.offsite.evaluate import evaluation_table
from privtune.common.offsite.package import EmulatorPackage
from privtune.common.offsite.plugin import plug_in
from privtune.common.ult.relabel import relabel_model, relabel_state
from privtune.server.run_folder import ADAPTERS, AGGREGATE


def evaluate_run(
    run_dir: Path,
    full_model: nn.Module,
    eval_blocks: torch.Tensor,
    seed: int,
    rows: torch.Tensor | None = None,
    title: str = "perplexity on the owners' held-out text",
) -> dict[str, float | None]:
    package = EmulatorPackage.load(run_dir / "emulator")
    final, _ = load_adapter(run_dir / ADAPTERS / AGGREGATE)
    emulator = package.instantiate(seed=seed)
    load_adapter_state(emulator, relabel_state(adapter_state(emulator), rows))
    tuned = package.instantiate(seed=seed)
    load_adapter_state(tuned, final)
    return evaluation_table(
        eval_blocks,
        full_model=relabel_model(full_model, rows),
        emulator=emulator,
        emulator_adapter=tuned,
        plugin=plug_in(full_model, final, package.adapter_manifest),
        title=title,
    )
