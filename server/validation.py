"""The model owner's gate in front of aggregation.

An update is accepted only if it is exactly the shape of the global adapter (same tensor names,
shapes and dtype), every value is finite, and its distance from the global adapter is within the
configured L2 bound. A single malformed or malicious update must not poison the aggregate, and a
broken client must not stop the round: rejected updates are logged with the node id and dropped.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from flwr.app import Message

from privtune.common.federation.records import ARRAYS, METRICS, NUM_EXAMPLES, decline_reason, from_arrays

log = logging.getLogger("privtune.server")


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
            elif float(content.metric_records[METRICS].get(NUM_EXAMPLES, 0)) <= 0:
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
