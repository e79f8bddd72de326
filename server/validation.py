"""The model owner's gate in front of aggregation.

An update is accepted only if it is exactly the shape of the global adapter (same tensor names,
shapes and dtype), every value is finite, and its distance from the global adapter is within the
configured L2 bound. A single malformed or malicious update must not poison the aggregate, and a
broken client must not stop the round: rejected updates are logged with the node id and dropped.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass

import torch
from flwr.app import Message, MetricRecord

from privtune.common.federation.records import ARRAYS, METRICS, NUM_EXAMPLES, decline_reason, from_arrays
from privtune.server.run_folder import AGGREGATE

log = logging.getLogger("privtune.server")

OWNER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
"""What a data owner may call itself: the name becomes a folder in the model owner's run folder."""
RESERVED_NAMES = frozenset({AGGREGATE})


@dataclass(frozen=True)
class Rejection:
    node_id: int
    reason: str


def check_update(update: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], clip: float) -> str | None:
    """Why ``update`` must not be aggregated against ``reference``, or None if it is acceptable."""
    missing = sorted(set(reference) - set(update))
    extra = sorted(set(update) - set(reference))
    if missing or extra:
        return f"tensor names differ from the global adapter (missing {missing[:3]}, unexpected {extra[:3]})"
    squared = 0.0
    for name, ref in reference.items():
        tensor = update[name]
        if tensor.shape != ref.shape:
            return f"{name} has shape {tuple(tensor.shape)}, expected {tuple(ref.shape)}"
        if tensor.dtype != ref.dtype:
            return f"{name} has dtype {tensor.dtype}, expected {ref.dtype}"
        if not torch.isfinite(tensor).all():
            return f"{name} contains NaN or infinite values"
        squared += float((tensor.double() - ref.double()).pow(2).sum())
    norm = math.sqrt(squared)
    if norm > clip:
        return f"update norm {norm:.3g} exceeds the bound {clip:.3g} (update-clip)"
    return None


def owner_name_problem(name: str) -> str | None:
    """Why a reported owner name must not be used, or None if it is acceptable."""
    if not OWNER_NAME.fullmatch(name):
        return (
            f"owner name {name[:80]!r} is not 1-64 letters, digits, '.', '_' or '-' (starting with a letter or digit)"
        )
    if name in RESERVED_NAMES or re.fullmatch(r"node-\d+", name):
        return f"owner name {name!r} is reserved"
    return None


def _example_count(metrics: MetricRecord) -> float:
    """The declared number of training examples; 0 when it is missing or not a number (a list)."""
    value = metrics.get(NUM_EXAMPLES, 0)
    return float(value) if isinstance(value, int | float) else 0.0


def review(
    replies: list[Message], reference: dict[str, torch.Tensor], clip: float
) -> tuple[list[Message], list[Rejection]]:
    """Split replies into those fit to aggregate and rejections with reasons (never raises)."""
    accepted, rejected = [], []
    for message in replies:
        node = message.metadata.src_node_id
        reason = decline_reason(message)
        if reason is None:
            content = message.content
            if ARRAYS not in content.array_records or METRICS not in content.metric_records:
                reason = "reply carries no adapter or no metrics"
            elif _example_count(content.metric_records[METRICS]) <= 0:
                reason = "reply reports no training examples"
            else:
                try:
                    reason = check_update(from_arrays(content.array_records[ARRAYS]), reference, clip)
                except Exception as err:  # an undecodable payload is the client's fault, not the server's
                    reason = f"payload could not be decoded: {err}"
        if reason is None:
            accepted.append(message)
        else:
            log.warning("round update from node %s rejected: %s", node, reason)
            rejected.append(Rejection(node, reason))
    return accepted, rejected
