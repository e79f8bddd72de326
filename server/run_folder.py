"""The model owner's run folder: per-round checkpoints (resume after a crash), metrics and plots.

Layout of ``run_dir``::

    checkpoint/           latest global adapter (safetensors) + state.json (last finished round, history)
                          + optimizer.safetensors (the server optimiser's moments, FedAdam only)
    adapters/owner-N/     each data owner's latest accepted adapter (the PMixED ensemble members)
    metrics.json/.csv     per-round figures and the final perplexity table
    plots/*.png           loss and perplexity per round, privacy spent per owner
    model/                the full model with the final aggregate plugged in
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from privtune.common.errors import PrivtuneError

OPTIMIZER_FILE = "optimizer.safetensors"


@dataclass
class Checkpoint:
    round: int
    adapter: dict[str, torch.Tensor]
    history: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    optimizer: dict[str, torch.Tensor] = field(default_factory=dict)


def strict_json(value: Any) -> Any:
    """NaN/inf become null: a figure that could not be measured is absent, and the file stays valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


class RunFolder:
    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    @property
    def checkpoint_dir(self) -> Path:
        return self.root / "checkpoint"

    def save_checkpoint(self, checkpoint: Checkpoint) -> None:
        """Write atomically: a crash mid-write leaves the previous checkpoint intact."""
        staging = self.root / ".checkpoint.tmp"
        staging.mkdir(parents=True, exist_ok=True)
        for leftover in staging.iterdir():  # of a write that crashed
            leftover.unlink()
        save_file({k: v.contiguous() for k, v in checkpoint.adapter.items()}, staging / "adapter.safetensors")
        if checkpoint.optimizer:
            save_file({k: v.contiguous() for k, v in checkpoint.optimizer.items()}, staging / OPTIMIZER_FILE)
        state = {"round": checkpoint.round, "history": checkpoint.history, "extra": checkpoint.extra}
        (staging / "state.json").write_text(json.dumps(state, indent=2))
        if self.checkpoint_dir.exists():
            old = self.root / ".checkpoint.old"
            os.replace(self.checkpoint_dir, old)
            os.replace(staging, self.checkpoint_dir)
            for path in old.iterdir():
                path.unlink()
            old.rmdir()
        else:
            os.replace(staging, self.checkpoint_dir)

    def load_checkpoint(self) -> Checkpoint | None:
        state_file = self.checkpoint_dir / "state.json"
        if not state_file.exists():
            return None
        try:
            state = json.loads(state_file.read_text())
            adapter = load_file(self.checkpoint_dir / "adapter.safetensors")
            optimizer_file = self.checkpoint_dir / OPTIMIZER_FILE
            optimizer = load_file(optimizer_file) if optimizer_file.exists() else {}
        except Exception as err:
            raise PrivtuneError(
                f"checkpoint in {self.checkpoint_dir} is unreadable ({err}); delete it to start over"
            ) from None
        return Checkpoint(state["round"], adapter, state.get("history", []), state.get("extra", {}), optimizer)

    def save_owner_adapter(self, owner: str, adapter: dict[str, torch.Tensor], manifest: dict[str, Any]) -> Path:
        folder = self.root / "adapters" / owner
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in adapter.items()}, folder / "adapter.safetensors")
        (folder / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
        return folder

    def write_metrics(self, metrics: dict[str, Any]) -> None:
        (self.root / "metrics.json").write_text(json.dumps(strict_json(metrics), indent=2, sort_keys=True) + "\n")
        rounds = metrics.get("rounds", [])
        if rounds:
            columns = [k for k in rounds[0] if not isinstance(rounds[0][k], (list, dict))]
            with open(self.root / "metrics.csv", "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(rounds)

    def write_plots(self, rounds: list[dict[str, Any]], privacy_by_owner: dict[str, dict[str, float]]) -> list[Path]:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator

        plots = self.root / "plots"
        plots.mkdir(exist_ok=True)
        written = []
        xs = [r["round"] for r in rounds]
        fig, (ax_loss, ax_ppl) = plt.subplots(1, 2, figsize=(10, 3.8))
        ax_loss.plot(xs, [r.get("loss", float("nan")) for r in rounds], marker="o")
        ax_loss.set(title="mean train loss of accepted updates", xlabel="round", ylabel="loss")
        ax_ppl.plot(xs, [r.get("plugin_ppl", float("nan")) for r in rounds], marker="o", label="plug-in (server)")
        ax_ppl.plot(
            xs,
            [r.get("emulator_adapter_ppl", float("nan")) for r in rounds],
            marker="s",
            label="emulator+adapter (owners' own held-out)",
        )
        ax_ppl.set(title="perplexity on held-out text", xlabel="round", ylabel="perplexity")
        ax_ppl.legend()
        for ax in (ax_loss, ax_ppl):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        fig.tight_layout()
        fig.savefig(plots / "training.png", dpi=110)
        plt.close(fig)
        written.append(plots / "training.png")
        privacy_by_owner = {owner: spent for owner, spent in privacy_by_owner.items() if spent}
        if privacy_by_owner:
            owners = sorted(privacy_by_owner)
            kinds = sorted({k for v in privacy_by_owner.values() for k in v})
            fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(owners)), 3.8))
            width = 0.8 / max(1, len(kinds))
            for i, kind in enumerate(kinds):
                ax.bar(
                    [j + i * width for j in range(len(owners))],
                    [privacy_by_owner[o].get(kind, 0.0) for o in owners],
                    width=width,
                    label=kind,
                )
            ax.set_xticks([j + width * (len(kinds) - 1) / 2 for j in range(len(owners))], owners)
            ax.set(title="privacy spent per data owner (epsilon)", ylabel="epsilon")
            ax.legend()
            fig.tight_layout()
            fig.savefig(plots / "privacy.png", dpi=110)
            plt.close(fig)
            written.append(plots / "privacy.png")
        return written
