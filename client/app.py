"""The data owner's Flower ClientApp.

``train``: receive the global adapter (and, once per run, the emulator package), train the adapter
against the frozen emulator on locally perturbed and encoded text, reply with the adapter and the
metrics the privacy mode lets the owner release (:mod:`privtune.client.releases`); on the member
track, reply with the owner's PMixED member adapters. ``evaluate``: perplexity of emulator + global
adapter on the owner's held-out text, without protection only (withheld under LDP or DP-SGD).
Problems the owner can explain (no data, budget exhausted, missing emulator) become a *declined*
reply with the reason, which the server logs; the round goes on without this owner. The reason
names only the step that failed (see :func:`public_reason`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from privtune.client.releases import EVALUATION_WITHHELD, may_evaluate
from privtune.client.site import SiteConfig
from privtune.client.trainer import OwnerTrainer
from privtune.common.errors import BudgetExceededError, PrivtuneError
from privtune.common.federation.config import FederationConfig
from privtune.common.federation.records import (
    ARRAYS,
    EMULATOR_UNAVAILABLE,
    MEMBER_TRACK,
    METRICS,
    OWNER,
    SITE_UNUSABLE,
    TRACK,
    declined,
    from_arrays,
    member_key,
    metric_record,
    round_config,
    to_arrays,
)

log = logging.getLogger("privtune.client")

_trainers: dict[tuple, OwnerTrainer] = {}

PUBLIC_REASONS = {
    "site": SITE_UNUSABLE,
    "emulator": EMULATOR_UNAVAILABLE,
    "training": "local training failed",
    "evaluation": "local evaluation failed",
}
BUDGET_REASON = "privacy budget exhausted"


def public_reason(err: Exception, stage: str, task: str) -> str:
    """What the model owner is told about a decline: the step that failed, never the error's text,
    which can name the site's paths, data sizes or budget figures. The full error stays in the
    data owner's log (with a traceback when it is not a :class:`PrivtuneError`, i.e. a bug)."""
    if isinstance(err, PrivtuneError):
        log.warning("declining to %s: %s", task, err)
    else:
        log.exception("declining to %s after an unexpected error", task)
    return BUDGET_REASON if isinstance(err, BudgetExceededError) else PUBLIC_REASONS[stage]


def _trainer(
    context: Context, overrides: Mapping[str, Any], node_overrides: Mapping[int, Mapping[str, Any]]
) -> OwnerTrainer:
    """One trainer per owner and run, kept across rounds (data is loaded and perturbed once)."""
    cfg = FederationConfig.from_run_config({**dict(context.run_config), **overrides})
    node_config = dict(context.node_config)
    partition = node_config.get("partition-id")
    if partition is not None:
        node_config.update(node_overrides.get(int(partition), {}))
    site = SiteConfig.from_node_config(node_config, cfg)
    key = (context.run_id, site.workspace, tuple(sorted(cfg.to_run_config().items())))
    if key not in _trainers:
        _trainers[key] = OwnerTrainer(site, cfg)
    return _trainers[key]


def handle_train(
    msg: Message, context: Context, overrides: Mapping[str, Any], node_overrides: Mapping[int, Mapping[str, Any]]
) -> Message:
    stage = "site"
    try:
        trainer = _trainer(context, overrides, node_overrides)
        stage = "emulator"
        trainer.receive_emulator(msg.content)
        stage = "training"
        content = train_reply(trainer, msg.content)
    except Exception as err:
        return Message(declined(public_reason(err, stage, "train")), reply_to=msg)
    return Message(content, reply_to=msg)


def train_reply(trainer: OwnerTrainer, request: RecordDict) -> RecordDict:
    """Everything a train reply carries: the federated track's adapter and releasable metrics, or the
    member track's members; the owner's name either way."""
    config = dict(round_config(request))
    start = from_arrays(request.array_records[ARRAYS])
    if config.get(TRACK) == MEMBER_TRACK:
        members = trainer.train_members(start, config)
        content = RecordDict({member_key(i): to_arrays(state) for i, state in enumerate(members)})
    else:
        state, metrics = trainer.train_round(start, config)
        content = RecordDict({ARRAYS: to_arrays(state), METRICS: metric_record(metrics)})
    content[OWNER] = ConfigRecord({"name": trainer.site.owner})
    return content


def handle_evaluate(
    msg: Message, context: Context, overrides: Mapping[str, Any], node_overrides: Mapping[int, Mapping[str, Any]]
) -> Message:
    stage = "site"
    try:
        trainer = _trainer(context, overrides, node_overrides)
        if not may_evaluate(trainer.cfg):
            return Message(declined(EVALUATION_WITHHELD), reply_to=msg)
        stage = "emulator"
        trainer.receive_emulator(msg.content)
        stage = "evaluation"
        metrics = trainer.evaluate(from_arrays(msg.content.array_records[ARRAYS]), dict(round_config(msg.content)))
    except Exception as err:
        return Message(declined(public_reason(err, stage, "evaluate")), reply_to=msg)
    return Message(RecordDict({METRICS: metric_record(metrics)}), reply_to=msg)


def build_app(
    overrides: Mapping[str, Any] | None = None, node_overrides: Mapping[int, Mapping[str, Any]] | None = None
) -> ClientApp:
    """A ClientApp whose run config is Flower's, updated with ``overrides`` (used by
    ``privtune simulate``, whose Simulation Engine call carries no run config), and whose node
    config for partition ``i`` is updated with ``node_overrides[i]``."""
    overrides, node_overrides = dict(overrides or {}), dict(node_overrides or {})
    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        return handle_train(msg, context, overrides, node_overrides)

    @client_app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return handle_evaluate(msg, context, overrides, node_overrides)

    return client_app


app = build_app()
