"""The data owner's Flower ClientApp.

``train``: receive the global adapter (and, once per run, the emulator package), train the adapter
against the frozen emulator on locally perturbed and encoded text, reply with the adapter, the
number of examples, the loss and the privacy spent. ``evaluate``: perplexity of emulator + global
adapter on the owner's held-out text. Problems the owner can explain (no data, budget exhausted,
missing emulator) become a *declined* reply with the reason, which the server logs; the round
goes on without this owner. The reason names only the step that failed (see :func:`public_reason`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from privtune.client.site import SiteConfig
from privtune.client.trainer import OwnerTrainer
from privtune.common.errors import BudgetExceededError, PrivtuneError
from privtune.common.federation.config import FederationConfig
from privtune.common.federation.records import ARRAYS, METRICS, OWNER, declined, from_arrays, to_arrays

log = logging.getLogger("privtune.client")

_trainers: dict[tuple, OwnerTrainer] = {}

PUBLIC_REASONS = {
    "site": "the data owner's site is not set up for this run (configuration or data)",
    "emulator": "the emulator package is not in the data owner's cache or failed verification",
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
        state, metrics = trainer.train_round(
            from_arrays(msg.content.array_records[ARRAYS]), dict(msg.content.config_records["config"])
        )
    except Exception as err:
        return Message(declined(public_reason(err, stage, "train")), reply_to=msg)
    return Message(
        RecordDict(
            {
                ARRAYS: to_arrays(state),
                METRICS: MetricRecord(metrics),
                OWNER: ConfigRecord({"name": trainer.site.owner}),
            }
        ),
        reply_to=msg,
    )


def handle_evaluate(
    msg: Message, context: Context, overrides: Mapping[str, Any], node_overrides: Mapping[int, Mapping[str, Any]]
) -> Message:
    stage = "site"
    try:
        trainer = _trainer(context, overrides, node_overrides)
        stage = "emulator"
        trainer.receive_emulator(msg.content)
        stage = "evaluation"
        metrics = trainer.evaluate(
            from_arrays(msg.content.array_records[ARRAYS]), dict(msg.content.config_records["config"])
        )
    except Exception as err:
        return Message(declined(public_reason(err, stage, "evaluate")), reply_to=msg)
    return Message(RecordDict({METRICS: MetricRecord(metrics)}), reply_to=msg)


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
