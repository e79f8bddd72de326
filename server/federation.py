"""The model owner's federated run: rounds, per-round plug-in evaluation, checkpoints, outputs.

Flower's strategy drives the rounds (``Strategy.start``); its ``evaluate_fn`` hook, called before the
first round and after every round, is where the model owner plugs the aggregate into the full model,
measures perplexity, prints the round line and checkpoints. A restarted server finds the checkpoint
and runs only the rounds that are left, starting from the last aggregate.

After the rounds, the member track (:mod:`privtune.server.member_track`) collects each owner's PMixED
members, trained from the public start on that owner's data alone; they, not the owners' federated
adapters, are written to ``adapters/<owner>/`` with ``depends_on`` in their manifests. The aggregate
(``adapters/aggregate``) records every owner whose update it absorbed.

Under LDP or DP-SGD the owners' held-out text is not protected, so no federated evaluation is asked
for (the owners would decline it anyway, see :mod:`privtune.client.releases`).
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid

from privtune.common.federation.config import FederationConfig
from privtune.common.federation.provenance import DEPENDS_ON, DependsOn, manifest_file, record_depends_on
from privtune.common.federation.records import (
    EMBEDDINGS_KEYED,
    EMULATOR_HASH,
    from_arrays,
    manifest_record,
    to_arrays,
)
from privtune.common.models import load_tokenizer
from privtune.common.offsite.evaluate import perplexity
from privtune.common.offsite.plugin import plug_in
from privtune.server.member_track import Member, train_members
from privtune.server.model_owner import ModelOwner
from privtune.server.run_folder import AGGREGATE, Checkpoint, RunFolder, run_identity
from privtune.server.strategy import make_strategy

log = logging.getLogger("privtune.server")

MEMBER_SPLIT = "member-split"


def run_federation(grid: Grid, cfg: FederationConfig) -> dict[str, Any]:
    folder = RunFolder(cfg.run_dir)
    folder.bind(run_identity(cfg), overwrite=cfg.overwrite)
    owner = ModelOwner.prepare(cfg)
    manifest = owner.package.adapter_manifest
    checkpoint = folder.load_checkpoint()
    if checkpoint is not None and checkpoint.extra.get(EMULATOR_HASH) != owner.package.content_hash:
        log.warning("checkpoint in %s belongs to another emulator package; starting over", folder.root)
        checkpoint = None
    done = checkpoint.round if checkpoint else 0
    history: list[dict[str, Any]] = list(checkpoint.history) if checkpoint else []
    extra: dict[str, Any] = dict(checkpoint.extra) if checkpoint else {EMULATOR_HASH: owner.package.content_hash}
    # Names this run's split of every owner's documents into member shards (disjoint within one split).
    extra.setdefault(MEMBER_SPLIT, secrets.token_hex(8))
    initial = checkpoint.adapter if checkpoint else owner.initial_adapter()
    remaining = cfg.num_server_rounds - done
    if done:
        print(
            f"[privtune] resuming from round {done} checkpoint in {folder.checkpoint_dir}; {max(remaining, 0)} "
            "round(s) left"
        )

    tensors, package_manifest = owner.package.to_parts()
    strategy = make_strategy(cfg, (to_arrays(tensors), manifest_record(package_manifest)), round_offset=done)
    if checkpoint is not None:
        strategy.restore_optimizer_state(checkpoint.optimizer)
    strategy.round_settings = lambda _round: {EMBEDDINGS_KEYED: bool(extra.get(EMBEDDINGS_KEYED))}
    started = time.perf_counter()

    def evaluate(local_round: int, arrays: ArrayRecord) -> MetricRecord:
        """Flower calls this before round 1 (local_round 0) and after every round."""
        if local_round == 0:
            if "zero_shot_ppl" not in extra:
                extra["zero_shot_ppl"] = zero_shot_ppl(owner, cfg)
            return MetricRecord({"plugin-ppl": extra["zero_shot_ppl"]})
        entry = strategy.rounds.get(local_round)
        if entry is not None and entry.accepted:
            # From the first aggregate on, embedding rows (ULT mode) are in the federation key's order.
            extra[EMBEDDINGS_KEYED] = True
        state = from_arrays(arrays)
        began = time.perf_counter()
        ppl = (
            perplexity(plug_in(owner.full_model, state, manifest), owner.eval_blocks)
            if owner.eval_blocks is not None
            else math.nan
        )
        row = round_row(done + local_round, entry, ppl)
        row["timing"] = round_timing(entry, time.perf_counter() - began)
        history.append(row)
        folder.save_checkpoint(Checkpoint(done + local_round, state, history, extra, strategy.optimizer_state()))
        print(format_round(row, cfg.num_server_rounds), flush=True)
        return MetricRecord({"plugin-ppl": ppl})

    if remaining > 0:
        result = strategy.start(
            grid,
            initial_arrays=to_arrays(initial),
            num_rounds=remaining,
            timeout=cfg.round_timeout,
            train_config=ConfigRecord({EMULATOR_HASH: owner.package.content_hash}),
            evaluate_config=ConfigRecord({EMULATOR_HASH: owner.package.content_hash}),
            evaluate_fn=evaluate,
        )
        final = from_arrays(result.arrays) if len(result.arrays) else initial  # empty: no round aggregated
    else:
        final = initial
    members: list[Member] | None = None
    refused: list[dict[str, str]] = []
    if cfg.member_shards > 0 and (remaining > 0 or not member_folders(folder)):
        members, refused = train_members(
            grid, strategy, cfg, owner.initial_adapter(), owner.package.content_hash, extra[MEMBER_SPLIT]
        )
    outputs = Outputs(final, history, members, refused)
    return finish(folder, owner, cfg, outputs, extra.get("zero_shot_ppl"), time.perf_counter() - started)


@dataclass
class Outputs:
    """What a run leaves: the aggregate, the round rows, and this start's members (None: kept as they are)."""

    final: dict[str, torch.Tensor]
    history: list[dict[str, Any]]
    members: list[Member] | None
    refused_members: list[dict[str, str]]


def member_folders(folder: RunFolder) -> list[Path]:
    adapters = folder.root / "adapters"
    return sorted(p for p in adapters.iterdir() if p.is_dir() and p.name != AGGREGATE) if adapters.is_dir() else []


def zero_shot_ppl(owner: ModelOwner, cfg: FederationConfig) -> float:
    """The full model before any adapter; in ULT mode only a key holder can measure it (see simulate)."""
    if owner.eval_blocks is None or cfg.encoding == "ult":
        return math.nan
    return perplexity(owner.full_model, owner.eval_blocks)


def round_row(server_round: int, entry, ppl: float) -> dict[str, Any]:
    metrics = entry.client_metrics if entry else {}
    accepted = entry.accepted if entry else []
    losses = [metrics[n]["train-loss"] for n in accepted if "train-loss" in metrics.get(n, {})]
    examples = sum(metrics[n].get("num-examples", 0.0) for n in accepted if n in metrics)
    names = entry.owner_names if entry else {}
    privacy = {
        names.get(node, f"node-{node}"): {k: v for k, v in m.items() if "epsilon" in k} for node, m in metrics.items()
    }
    return {
        "round": server_round,
        "loss": sum(losses) / len(losses) if losses else float("nan"),
        "plugin_ppl": ppl,
        "emulator_adapter_ppl": math.exp(entry.eval_loss) if entry and entry.eval_loss is not None else float("nan"),
        "examples": examples,
        "bytes_down": entry.bytes_down if entry else 0,
        "bytes_up": entry.bytes_up if entry else 0,
        "emulator_sent_to": len(entry.sent_emulator_to) if entry else 0,
        "records_down": sorted(entry.records_down) if entry else [],
        "accepted": len(accepted),
        "accepted_owners": sorted(names.get(n, f"node-{n}") for n in accepted),
        "rejected": [
            {"node": r.node_id, "owner": names.get(r.node_id, f"node-{r.node_id}"), "reason": r.reason}
            for r in (entry.rejected if entry else [])
        ],
        "privacy": privacy,
    }


def round_timing(entry, evaluate_seconds: float) -> dict[str, float]:
    """Wall time of the round split into its parts. Owners train in parallel, so "train" is the
    slowest accepted owner's training time; "communicate" is what remains of the round's wall time
    (message transport, (de)serialisation, client set-up and client-side evaluation)."""
    if entry is None:
        return {}
    wall = time.perf_counter() - entry.started
    train = max((m.get("train-seconds", 0.0) for m in entry.client_metrics.values()), default=0.0)
    return {
        "wall_s": wall,
        "train_s": train,
        "aggregate_s": entry.aggregate_seconds,
        "evaluate_s": evaluate_seconds,
        "communicate_s": max(0.0, wall - train - entry.aggregate_seconds - evaluate_seconds),
    }


def format_round(row: dict[str, Any], total: int) -> str:
    spent = ", ".join(
        f"{owner}: " + " ".join(f"{k}={v:.3g}" for k, v in sorted(p.items()))
        for owner, p in sorted(row["privacy"].items())
        if p
    )
    # owners under DP-SGD do not release their training loss (computed from their unperturbed data)
    loss = f"loss {row['loss']:.4f}" if math.isfinite(row["loss"]) else "loss not released"
    return (
        f"[round {row['round']}/{total}] {loss}  plug-in ppl {row['plugin_ppl']:.2f}  "
        f"examples {row['examples']:.0f}  sent {row['bytes_down'] / 1e6:.2f} MB  "
        f"received {row['bytes_up'] / 1e6:.2f} MB  "
        f"accepted {row['accepted']}  rejected {len(row['rejected'])}" + (f"  privacy [{spent}]" if spent else "")
    )


def finish(
    folder: RunFolder,
    owner: ModelOwner,
    cfg: FederationConfig,
    outputs: Outputs,
    zero_shot_ppl: float | None,
    seconds: float,
) -> dict[str, Any]:
    manifest = owner.package.adapter_manifest
    history = outputs.history
    plugged = plug_in(owner.full_model, outputs.final, manifest)
    folder.save_model(plugged, load_tokenizer(cfg.model))
    owner.package.save(folder.root / "emulator")
    if outputs.members is not None:
        save_members(folder, outputs.members, manifest.to_dict())
    aggregate = folder.save_owner_adapter(AGGREGATE, outputs.final, manifest.to_dict())
    absorbed = sorted({name for row in history for name in row.get("accepted_owners", [])})
    if absorbed:
        record_depends_on(aggregate, DependsOn(tuple(absorbed)))
    privacy_by_owner: dict[str, dict[str, float]] = {}
    for row in history:
        for node, spent in row["privacy"].items():
            privacy_by_owner.setdefault(node, {}).update(spent)
    metrics = {
        "zero_shot_ppl": zero_shot_ppl,
        "plugin_ppl": history[-1]["plugin_ppl"] if history else None,
        "emulator_adapter_ppl": history[-1]["emulator_adapter_ppl"] if history else None,
        "rounds": history,
        "members": {p.name: json.loads(manifest_file(p).read_text()).get(DEPENDS_ON) for p in member_folders(folder)},
        "members_refused": outputs.refused_members,
        "privacy_reported": privacy_by_owner,
        "config": cfg.to_run_config(),
        "emulator_hash": owner.package.content_hash,
        "seconds": seconds,
    }
    folder.write_metrics(metrics)
    folder.write_plots(history, privacy_by_owner)
    (folder.root / "adapter_manifest.json").write_text(json.dumps(manifest.to_dict(), indent=2, sort_keys=True))
    return metrics


def save_members(folder: RunFolder, members: list[Member], manifest: dict[str, Any]) -> None:
    """This start's members replace whatever members the folder held (an earlier start's split)."""
    for stale in member_folders(folder):
        shutil.rmtree(stale)
    for member in members:
        saved = folder.save_owner_adapter(member.name, member.state, manifest)
        record_depends_on(saved, member.depends_on)
