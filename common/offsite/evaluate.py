"""Perplexity on held-out text, and the offsite-tuning comparison table.

The table puts the plug-in next to emulator + adapter on the same text: plug-in close to full
fine-tuning shows the adapter transfers; emulator + adapter clearly worse shows the emulator does
not give the full model away.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from privtune.common.errors import PrivtuneError
from privtune.common.offsite.lm import forward_logits, next_token_nll
from privtune.common.tokens import TokenRows, target_count


@torch.no_grad()
def perplexity(model: nn.Module, blocks: torch.Tensor | TokenRows, batch_size: int = 8) -> float:
    """exp of the token-weighted mean next-token NLL over the target tokens of all blocks (every token
    of id rows; the responses of instruction data)."""
    rows = TokenRows.of(blocks)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            total += next_token_nll(forward_logits(model, batch.ids), batch.labels, reduction="sum").item()
            count += target_count(batch.labels)
    finally:
        model.train(was_training)
    if count == 0:
        raise PrivtuneError("the held-out blocks hold no target token to score (only prompts); add held-out data")
    return math.exp(total / count)


@dataclass(frozen=True)
class Row:
    key: str
    label: str


ROWS = (
    Row("zero_shot", "full model, zero-shot"),
    Row("emulator", "emulator alone"),
    Row("emulator_adapter", "emulator + trained adapter"),
    Row("plugin", "plug-in: full model + trained adapter"),
    Row("full_ft", "full fine-tuning (reference)"),
)


def evaluation_table(
    heldout: torch.Tensor | TokenRows,
    *,
    full_model: nn.Module | None = None,
    emulator: nn.Module | None = None,
    emulator_adapter: nn.Module | None = None,
    plugin: nn.Module | None = None,
    full_ft: nn.Module | None = None,
    batch_size: int = 8,
    title: str = "perplexity on held-out text",
) -> dict[str, float | None]:
    """Perplexity of each given model on the same ``heldout`` blocks; prints and returns the table.

    Keys follow :data:`ROWS`; a model not given is reported as None ("-"). With :class:`TokenRows`
    only the labelled positions count (a conversation's responses).
    """
    models = {
        "zero_shot": full_model,
        "emulator": emulator,
        "emulator_adapter": emulator_adapter,
        "plugin": plugin,
        "full_ft": full_ft,
    }
    results = {
        row.key: (None if (model := models[row.key]) is None else perplexity(model, heldout, batch_size))
        for row in ROWS
    }
    width = max(len(row.label) for row in ROWS)
    print(f"\n{title} ({heldout.shape[0]} blocks x {heldout.shape[1]} tokens)")
    for row in ROWS:
        value = results[row.key]
        print(f"  {row.label:<{width}}  {'-' if value is None else f'{value:10.2f}'}")
    return results


def emulator_quality(full_model: nn.Module, emulator: nn.Module, blocks: torch.Tensor, batch_size: int = 8) -> dict:
    """How well the emulator stands in for the full model on public held-out text.

    The ratio emulator / full perplexity is what the package records: near 1 the adapters data
    owners train against it transfer; far above 1 they learn to repair the emulator instead.
    """
    full = perplexity(full_model, blocks, batch_size)
    emulated = perplexity(emulator, blocks, batch_size)
    return {"emulator_ppl": emulated, "full_ppl": full, "ratio": emulated / full, "blocks": list(blocks.shape)}
