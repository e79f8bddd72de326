"""The model owner's run folder: per-round checkpoints (resume after a crash), metrics and plots.

Layout of ``run_dir``::

    run.json              the run's configuration (a different run is refused here unless overwritten)
    checkpoint            link to the latest complete checkpoints/round-N-*/ folder, switched atomically
    checkpoints/round-N-*/  global adapter (safetensors) + state.json (last finished round, history)
                          + optimizer.safetensors (the server optimiser's moments, FedAdam only)
    adapters/<owner>/     each data owner's latest accepted adapter (the PMixED ensemble members), and
                          adapters/aggregate/; peft folders (see privtune.common.offsite.adapter.folder)
    metrics.json/.csv     per-round figures and the final perplexity table
    plots/*.png           loss and perplexity per round, privacy spent per owner
    model/                the full model with the final aggregate plugged in, and its tokenizer: it loads with
                          AutoModelForCausalLM + AutoTokenizer and 'privtune models'; a ULT run keeps the
                          public ULT table there instead (ids are in the federation key's order: decode with the key)
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from privtune.common.errors import PrivtuneError
from privtune.common.federation.config import FederationConfig
from privtune.common.models import LoadedModel, save_model
from privtune.common.offsite.adapter import AdapterManifest, save_adapter
from privtune.common.text_tokenizer import TextTokenizer

log = logging.getLogger("privtune.server")

CHECKPOINT = "checkpoint"
CHECKPOINTS = "checkpoints"
ADAPTERS = "adapters"
AGGREGATE = "aggregate"
"""The folder under ``adapters/`` with the federated adapter (a reserved owner name)."""
MODEL = "model"
ADAPTER_FILE = "adapter.safetensors"
STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
RUN_FILE = "run.json"
RUN_ENTRIES = (
    CHECKPOINT,
    CHECKPOINTS,
    ADAPTERS,
    "metrics.json",
    "metrics.csv",
    "plots",
    MODEL,
    "emulator",
    "adapter_manifest.json",
)
"""What a run writes into its folder (and ``--overwrite`` removes)."""
RESUMABLE_KEYS = frozenset(
    {
        "num-server-rounds",
        "round-timeout",
        "run-dir",
        "eval-ids",
        "overwrite",
        "device",
        "emulator-quantize",
        "gradient-checkpointing",
    }
)
MEMBER_FOLDER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,127}")
"""Names of folders under ``adapters/``: an owner's validated name, ``name@node-N``, ``node-N``, ``aggregate``."""


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


def inside(root: Path, *parts: str) -> Path:
    """``root / parts`` after proving it stays inside ``root``: parts built from received values (an
    owner's name) must not climb out with ``..``, an absolute path or a symlink."""
    path = root.joinpath(*parts)
    if not path.resolve().is_relative_to(root.resolve()):
        raise PrivtuneError(f"{'/'.join(parts)!r} would leave {root}; refusing to write there")
    return path


def run_identity(cfg: FederationConfig, emulator_hash: str = "") -> dict[str, Any]:
    """What makes two starts the same run: every run-config key except those a resumed run may
    change (a longer plan, a longer timeout, where the folder is, whether to overwrite, and how the
    hardware runs it: device, 4-bit frozen emulator, gradient checkpointing)."""
    identity = {k: v for k, v in cfg.to_run_config().items() if k not in RESUMABLE_KEYS}
    return {**identity, "emulator-hash": emulator_hash} if emulator_hash else identity


def bind_run(root: Path, identity: dict[str, Any], entries: tuple[str, ...], *, overwrite: bool) -> None:
    """Record in ``root/run.json`` which run the folder holds, refusing a different one.

    A folder that holds another run's outputs (``entries``: the names this kind of run writes) is
    resumed only by the same run: mixing a second configuration's rounds, checkpoint or members
    into it would give outputs that belong to neither. ``overwrite`` removes those entries (and
    nothing else in the folder) and starts afresh.
    """
    identity = json.loads(json.dumps(identity))  # as it reads back: tuples become lists, keys text
    record = root / RUN_FILE
    recorded = json.loads(record.read_text()) if record.exists() else None
    present = [name for name in entries if (root / name).exists() or (root / name).is_symlink()]
    if recorded == identity or (recorded is None and not present):
        pass
    elif not overwrite:
        differs = sorted(
            k for k in (recorded or {}).keys() | identity.keys() if (recorded or {}).get(k) != identity.get(k)
        )
        what = f"a run whose {', '.join(differs[:6])} differ" if recorded is not None else "outputs of an earlier run"
        raise PrivtuneError(
            f"{root} holds {what}; choose another folder, or pass --overwrite (run config overwrite=true) "
            "to delete that run's outputs and start this one"
        )
    else:
        log.warning("overwriting the run in %s (%s)", root, ", ".join(present) or "no outputs yet")
        for name in present:
            path = root / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
    root.mkdir(parents=True, exist_ok=True)
    partial = root / f".{RUN_FILE}.tmp"
    partial.write_text(json.dumps(identity, indent=2, sort_keys=True) + "\n")
    os.replace(partial, record)


def locate_run(path: Path) -> Path:
    """The server's run folder at ``path``, or in the ``--out`` folder of simulate/demo that holds it as ``server/``."""
    for candidate in (path, path / "server"):
        if (candidate / ADAPTERS).is_dir():
            return candidate
    raise PrivtuneError(f"{path} has no {ADAPTERS}/ folder: is it a finished federated run (privtune simulate --out)?")


def recorded_model(run: Path) -> str:
    """The base model source a finished run recorded (``config.model`` in its metrics.json)."""
    metrics = run / "metrics.json"
    try:
        return str(json.loads(metrics.read_text())["config"]["model"])
    except (FileNotFoundError, KeyError, TypeError, json.JSONDecodeError):
        raise PrivtuneError(
            f"{metrics} does not name the run's base model (config.model); pass it with --model"
        ) from None


class RunFolder:
    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    @property
    def checkpoint_dir(self) -> Path:
        return self.root / CHECKPOINT

    def bind(self, identity: dict[str, Any], *, overwrite: bool = False) -> None:
        bind_run(self.root, identity, RUN_ENTRIES, overwrite=overwrite)

    def save_checkpoint(self, checkpoint: Checkpoint) -> None:
        """Write the checkpoint into a folder of its own, then switch the ``checkpoint`` link to it.

        The switch is one rename of a symlink, so at every instant the link names a complete
        checkpoint: the previous one until the rename, this one after. A crash before it leaves
        a partial folder that nothing names; a crash after it leaves the previous folder. Both are
        removed by the next save.
        """
        store = self.root / CHECKPOINTS
        store.mkdir(exist_ok=True)
        folder = store / f"round-{checkpoint.round:06d}-{secrets.token_hex(4)}"
        folder.mkdir()
        save_file({k: v.contiguous() for k, v in checkpoint.adapter.items()}, folder / ADAPTER_FILE)
        if checkpoint.optimizer:
            save_file({k: v.contiguous() for k, v in checkpoint.optimizer.items()}, folder / OPTIMIZER_FILE)
        state = {"round": checkpoint.round, "history": checkpoint.history, "extra": checkpoint.extra}
        (folder / STATE_FILE).write_text(json.dumps(state, indent=2))
        for path in [*folder.iterdir(), folder, store]:
            _fsync(path)
        link = self.root / f".{CHECKPOINT}.{secrets.token_hex(4)}"
        os.symlink(Path(CHECKPOINTS) / folder.name, link)
        os.replace(link, self.checkpoint_dir)
        _fsync(self.root)
        self._remove_stale_checkpoints(keep=folder.name)

    def _remove_stale_checkpoints(self, keep: str) -> None:
        for path in (self.root / CHECKPOINTS).iterdir():
            if path.name != keep:
                shutil.rmtree(path)
        for path in self.root.glob(f".{CHECKPOINT}.*"):
            path.unlink()

    def load_checkpoint(self) -> Checkpoint | None:
        folder = self.checkpoint_dir
        if not folder.exists():
            if folder.is_symlink():
                raise PrivtuneError(
                    f"{folder} names {os.readlink(folder)}, which is missing; delete {folder} to start over"
                )
            return None
        try:
            state = json.loads((folder / STATE_FILE).read_text())
            adapter = load_file(folder / ADAPTER_FILE)
            optimizer_file = folder / OPTIMIZER_FILE
            optimizer = load_file(optimizer_file) if optimizer_file.exists() else {}
        except Exception as err:
            raise PrivtuneError(f"checkpoint in {folder} is unreadable ({err}); delete it to start over") from None
        return Checkpoint(state["round"], adapter, state.get("history", []), state.get("extra", {}), optimizer)

    def save_owner_adapter(self, owner: str, adapter: dict[str, torch.Tensor], manifest: dict[str, Any]) -> Path:
        if not MEMBER_FOLDER.fullmatch(owner):
            raise PrivtuneError(f"{owner!r} is not a member folder name (letters, digits, '.', '_', '-', '@')")
        folder = inside(self.root, ADAPTERS, owner)
        return save_adapter(folder, adapter, AdapterManifest.from_dict(manifest))

    def save_model(self, model: nn.Module, tokenizer: TextTokenizer) -> Path:
        return save_model(LoadedModel(model, tokenizer, str(self.root / MODEL)), self.root / MODEL)

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


def _fsync(path: Path) -> None:
    """Push a file's or folder's contents to disk, so a checkpoint named by the link survives a power cut too."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
