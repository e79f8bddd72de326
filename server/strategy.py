"""Flower strategies for offsite-tuning: Flower's own FedAvg / FedAdam / FedProx, plus the model
owner's duties around them.

The mixin adds four things to whichever Flower strategy aggregates:
- the emulator package rides along only the first time a node is addressed in a run (clients cache
  it by content hash), so later rounds carry adapters only;
- every reply passes :mod:`server.validation` before aggregation; rejected or declined replies are
  logged and excluded, and the round goes on with the rest;
- each owner's name is checked and bound to its node (it names the owner's member folder), and
  each accepted update is weighted equally, or by its declared example count capped at
  ``max-examples-per-owner``: no owner's claim can outweigh the others beyond that cap;
- per-round bookkeeping (bytes each way, rejections, each owner's latest accepted adapter; after
  round 1 that adapter depends on every owner's data, so PMixED's members come from the member
  track instead, see :mod:`privtune.server.member_track`).

A resumed run must continue the same optimisation, so the mixin also carries ``round_offset`` (the
rounds finished before this start: Flower's own strategy, and the clients' per-round seeds, see
global round numbers while this run's bookkeeping stays local) and FedOpt's moments
(:meth:`optimizer_state`, checkpointed with the adapter).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, MetricRecordValues, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

from privtune.common.federation.config import FederationConfig
from privtune.common.federation.records import (
    ARRAYS,
    EMULATOR,
    EMULATOR_MANIFEST,
    METRICS,
    NUM_EXAMPLES,
    OWNER,
    content_bytes,
    decline_reason,
    declined_before_emulator,
    from_arrays,
    to_arrays,
)
from privtune.server.validation import Rejection, owner_name_problem, review

log = logging.getLogger("privtune.server")

OPTIMIZER_MOMENTS = ("m_t", "v_t")
"""FedOpt's (FedAdam's, FedYogi's, ...) per-array moment estimates, as Flower names them."""


@dataclass
class RoundLog:
    bytes_down: int = 0
    bytes_up: int = 0
    sent_emulator_to: list[int] = field(default_factory=list)
    records_down: set[str] = field(default_factory=set)
    accepted: list[int] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    client_metrics: dict[int, dict[str, MetricRecordValues]] = field(default_factory=dict)
    eval_loss: float | None = None
    owner_names: dict[int, str] = field(default_factory=dict)
    started: float = 0.0
    aggregate_seconds: float = 0.0


class OffsiteMixin(FedAvg):
    """Wraps a Flower strategy's configure/aggregate with emulator delivery and update validation.

    A FedAvg subclass so that its ``super()`` calls type-check: every strategy it is mixed into
    (FedAvg, FedAdam, FedProx) derives from FedAvg and comes after the mixin in the MRO.
    """

    def setup_offsite(
        self,
        emulator: tuple[ArrayRecord, ConfigRecord],
        update_clip: float,
        round_offset: int = 0,
        max_examples: int = 0,
    ) -> None:
        self.emulator_records = emulator
        self.update_clip = update_clip
        self.max_examples = max_examples
        self.round_offset = round_offset
        self.nodes_with_emulator: set[int] = set()
        self.rounds: dict[int, RoundLog] = {}
        self._reference: dict[str, torch.Tensor] = {}
        self._name_holders: dict[str, int] = {}
        self._node_names: dict[int, str] = {}
        self.round_settings: Callable[[int], dict[str, Any]] = lambda _round: {}
        """Run-specific config keys added to each round's train and evaluate messages (see federation)."""

    def _owner_name(self, node: int, claimed: str) -> str | Rejection:
        """The name a node is known by in this run, bound to the node on first use.

        A name is a label, not an identity: a second node claiming a held name is told apart by its
        node id rather than overwriting the holder's member. A node that changes its name is refused
        (one owner must not become several ensemble members), and so is a name that is not a plain
        folder name (it becomes ``adapters/<name>`` on this machine).
        """
        problem = owner_name_problem(claimed)
        if problem is not None:
            return Rejection(node, problem)
        holder = self._name_holders.setdefault(claimed, node)
        name = claimed if holder == node else f"{claimed}@node-{node}"
        bound = self._node_names.setdefault(node, name)
        if bound != name:
            return Rejection(node, f"node {node} reported owner name {bound!r} earlier in this run, now {claimed!r}")
        return name

    def _name_replies(self, replies: list[Message], entry: RoundLog) -> tuple[list[Message], list[Rejection]]:
        """Replies whose sender's name is usable (recorded in ``entry``), and rejections for the rest."""
        usable, refused = [], []
        for message in replies:
            node = message.metadata.src_node_id
            if not message.has_error() and ARRAYS in message.content.array_records:
                owner = message.content.config_records.get(OWNER)
                name = self._owner_name(node, str(owner.get("name", "")) if owner else f"node-{node}")
                if isinstance(name, Rejection):
                    log.warning("round update from node %s rejected: %s", node, name.reason)
                    refused.append(name)
                    continue
                entry.owner_names[node] = name
            usable.append(message)
        return usable, refused

    def _weighed(self, accepted: list[Message]) -> list[Message]:
        """The accepted updates with their aggregation weights: equal (``max-examples-per-owner`` 0),
        or the owner's declared example count capped at that bound. The count is the owner's
        unverifiable claim, so uncapped it lets one owner outweigh all others (1e9 examples make
        the aggregate its own update)."""
        weighed = []
        for message in accepted:
            metrics = MetricRecord(dict(message.content.metric_records[METRICS]))
            declared = float(metrics[NUM_EXAMPLES])  # type: ignore[arg-type]
            metrics[NUM_EXAMPLES] = min(declared, float(self.max_examples)) if self.max_examples else 1.0
            content = RecordDict(dict(message.content.items()))
            content[METRICS] = metrics
            # Flower's overloads leave out the metadata keyword that rebuilds a received message
            weighed.append(Message(content=content, metadata=message.metadata))  # type: ignore[call-overload]
        return weighed

    def optimizer_state(self) -> dict[str, torch.Tensor]:
        """The server optimiser's moments (FedAdam's ``m_t``, ``v_t``; empty for FedAvg/FedProx)."""
        return {
            f"{name}/{key}": torch.from_numpy(np.array(value))
            for name in OPTIMIZER_MOMENTS
            for key, value in (getattr(self, name, None) or {}).items()
        }

    def restore_optimizer_state(self, state: dict[str, torch.Tensor]) -> None:
        for name in OPTIMIZER_MOMENTS:
            moments = {key.split("/", 1)[1]: t.numpy() for key, t in state.items() if key.startswith(f"{name}/")}
            if moments:
                setattr(self, name, moments)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        config = ConfigRecord({**dict(config), **self.round_settings(server_round)})
        messages = list(super().configure_train(server_round + self.round_offset, arrays, config, grid))
        self._reference = from_arrays(arrays)
        entry = self.rounds.setdefault(server_round, RoundLog())
        entry.started = time.perf_counter()
        personalised = []
        for message in messages:
            node = message.metadata.dst_node_id
            content = RecordDict(dict(message.content.items()))
            if node not in self.nodes_with_emulator:
                content[EMULATOR], content[EMULATOR_MANIFEST] = self.emulator_records
                entry.sent_emulator_to.append(node)
            entry.bytes_down += content_bytes(content)
            entry.records_down.update(content.array_records)
            personalised.append(Message(content=content, message_type=message.metadata.message_type, dst_node_id=node))
        return personalised

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        entry = self.rounds.setdefault(server_round, RoundLog())
        began = time.perf_counter()
        for message in replies:
            if not message.has_error():
                entry.bytes_up += content_bytes(message.content)
                # A reply the ClientApp produced means it cached the emulator, unless it declined before that.
                if declined_before_emulator(message):
                    self.nodes_with_emulator.discard(message.metadata.src_node_id)
                else:
                    self.nodes_with_emulator.add(message.metadata.src_node_id)
                if METRICS in message.content.metric_records:
                    entry.client_metrics[message.metadata.src_node_id] = dict(message.content.metric_records[METRICS])
        named, refused = self._name_replies(replies, entry)
        accepted, rejected = review(named, self._reference, self.update_clip)
        entry.rejected.extend(refused + rejected)
        entry.accepted = [m.metadata.src_node_id for m in accepted]
        try:
            if not accepted:
                return None, None
            arrays, metrics = super().aggregate_train(server_round + self.round_offset, self._weighed(accepted))
            return self._in_sent_dtypes(arrays), metrics
        finally:
            entry.aggregate_seconds = time.perf_counter() - began

    def _in_sent_dtypes(self, arrays: ArrayRecord | None) -> ArrayRecord | None:
        """The aggregate in the dtypes the round's adapter was sent in: FedOpt's update comes out in
        float64 (numpy promotes through its float64 step size), which no adapter manifest accepts."""
        if arrays is None:
            return None
        state = from_arrays(arrays)
        return to_arrays({k: v.to(self._reference[k].dtype) if k in self._reference else v for k, v in state.items()})

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        config = ConfigRecord({**dict(config), **self.round_settings(server_round)})
        return super().configure_evaluate(server_round + self.round_offset, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        usable = [m for m in replies if decline_reason(m) is None and "metrics" in m.content.metric_records]
        metrics = super().aggregate_evaluate(server_round + self.round_offset, usable) if usable else None
        loss = metrics.get("eval-loss") if metrics is not None else None
        if isinstance(loss, int | float):
            self.rounds.setdefault(server_round, RoundLog()).eval_loss = float(loss)
        return metrics


class OffsiteFedAvg(OffsiteMixin, FedAvg):
    pass


class OffsiteFedAdam(OffsiteMixin, FedAdam):
    pass


class OffsiteFedProx(OffsiteMixin, FedProx):
    pass


def make_strategy(
    cfg: FederationConfig, emulator: tuple[ArrayRecord, ConfigRecord], round_offset: int = 0
) -> OffsiteMixin:
    common: dict[str, Any] = dict(
        fraction_train=cfg.fraction_train,
        fraction_evaluate=0.0 if cfg.private else 1.0,  # held-out text is unprotected: see client.releases
        min_train_nodes=cfg.min_train_nodes,
        min_evaluate_nodes=cfg.min_train_nodes,
        min_available_nodes=cfg.min_train_nodes,
    )
    strategy: OffsiteMixin
    if cfg.strategy == "fedadam":
        strategy = OffsiteFedAdam(eta=cfg.server_learning_rate, eta_l=cfg.learning_rate, **common)
    elif cfg.strategy == "fedprox":
        strategy = OffsiteFedProx(proximal_mu=cfg.proximal_mu, **common)
    else:
        strategy = OffsiteFedAvg(**common)
    strategy.setup_offsite(emulator, cfg.update_clip, round_offset, cfg.max_examples_per_owner)
    return strategy
