"""Names and shapes of what travels in Flower messages, in one place for both sides.

Server -> client (train): ``arrays`` (the global adapter), ``config`` (round settings: the keys
below) and, the first time a node is addressed in a run, ``emulator`` + ``emulator-manifest`` (the
emulator package; clients cache it by content hash). Client -> server: ``arrays`` (the trained
adapter), ``metrics`` (what the owner may release in its privacy mode, see
:mod:`privtune.client.releases`), ``owner`` (the owner's name) or, when the owner declines to train
(no data, budget exhausted), only ``status`` with the reason.

The member track (``config[TRACK] == MEMBER_TRACK``, once per run after the federated rounds) sends
the public starting adapter as ``arrays``; the reply carries ``member-<i>`` (the adapter trained on
shard ``i`` of the owner's data alone) and ``owner``, nothing else. Nothing else crosses; in
particular no text and no ULT table.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
STATUS = "status"
EMULATOR = "emulator"
EMULATOR_MANIFEST = "emulator-manifest"
NUM_EXAMPLES = "num-examples"
OWNER = "owner"

# keys of the ``config`` record the server sends
EMULATOR_HASH = "emulator-hash"
EMBEDDINGS_KEYED = "embeddings-keyed"
SERVER_ROUND = "server-round"
PROXIMAL_MU = "proximal-mu"
TRACK = "track"
MEMBER_TRACK = "member"
MEMBER_PREFIX = "member-"


def member_key(shard: int) -> str:
    return f"{MEMBER_PREFIX}{shard}"


def member_shard(key: str) -> int | None:
    """The shard index of a ``member-<i>`` record key, None for any other key."""
    suffix = key.removeprefix(MEMBER_PREFIX)
    return int(suffix) if key.startswith(MEMBER_PREFIX) and suffix.isdigit() else None


def round_config(content: RecordDict) -> ConfigRecord:
    return content.config_records.get(CONFIG, ConfigRecord())


def to_arrays(state: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({k: v.detach().cpu().contiguous() for k, v in state.items()})


def from_arrays(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return dict(record.to_torch_state_dict())


def metric_record(values: Mapping[str, float]) -> MetricRecord:
    return MetricRecord({name: float(value) for name, value in values.items()})


def manifest_record(manifest: dict[str, Any]) -> ConfigRecord:
    return ConfigRecord({"json": json.dumps(manifest, sort_keys=True)})


def manifest_from_record(record: ConfigRecord) -> dict[str, Any]:
    return json.loads(str(record["json"]))


def declined(reason: str, **metrics: float) -> RecordDict:
    """Reply content for an owner that will not train this round, with the reason in words."""
    content = RecordDict({STATUS: ConfigRecord({"state": "declined", "reason": reason})})
    if metrics:
        content[METRICS] = MetricRecord(dict(metrics))
    return content


SITE_UNUSABLE = "the data owner's site is not set up for this run (configuration or data)"
EMULATOR_UNAVAILABLE = "the emulator package is not in the data owner's cache or failed verification"


def declined_before_emulator(message: Message) -> bool:
    """Whether an owner declined before it could cache the emulator, so it must be sent again."""
    status = None if message.has_error() else message.content.config_records.get(STATUS)
    return status is not None and status.get("reason") in (SITE_UNUSABLE, EMULATOR_UNAVAILABLE)


def decline_reason(message: Message) -> str | None:
    if message.has_error():
        return f"error: {message.error.reason}"
    status = message.content.config_records.get(STATUS)
    if status is not None and status.get("state") == "declined":
        return f"declined: {status.get('reason')!s}"
    return None


def content_bytes(content: RecordDict) -> int:
    """Bytes of the tensors and values a message carries (what the wire has to move, roughly).

    Counted here rather than by Flower's ``count_bytes``, which raises on an empty text value: a
    reply carrying one (an owner named "") must be rejected, not stop the model owner's round.
    """
    total = sum(record.count_bytes() for record in content.array_records.values())
    for values in list(content.config_records.values()) + list(content.metric_records.values()):
        total += sum(len(key) + _value_bytes(value) for key, value in values.items())
    return total


def _value_bytes(value: Any) -> int:
    items = value if isinstance(value, list) else [value]
    return sum(len(v) if isinstance(v, (str, bytes)) else 1 if isinstance(v, bool) else 8 for v in items)
