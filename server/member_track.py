"""The member track: each owner's PMixED members, trained from the public start on its own data alone.

Every federated adapter after round 1 starts from an aggregate of all owners' updates, so none of
them may be a PMixED member (the service's privacy unit is one member's data). After the federated
rounds the model owner sends every owner the public starting adapter (the package's, never an
aggregate) with ``config[track] = member``; the owner trains ``member-shards`` adapters from it, each
on one disjoint shard of its documents, and replies with them (``member-<i>``) and its name only.
Each accepted member is recorded as depending on that owner's shard (``depends_on``), which
``privtune serve`` checks.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from privtune.common.federation.config import FederationConfig
from privtune.common.federation.provenance import DependsOn
from privtune.common.federation.records import (
    ARRAYS,
    CONFIG,
    EMBEDDINGS_KEYED,
    EMULATOR,
    EMULATOR_HASH,
    EMULATOR_MANIFEST,
    MEMBER_TRACK,
    OWNER,
    SERVER_ROUND,
    TRACK,
    decline_reason,
    from_arrays,
    member_key,
    member_shard,
    to_arrays,
)
from privtune.server.strategy import OffsiteMixin
from privtune.server.validation import check_update

log = logging.getLogger("privtune.server")


@dataclass(frozen=True)
class Member:
    name: str
    state: dict[str, torch.Tensor]
    depends_on: DependsOn


def member_name(owner: str, shard: int, shards: int) -> str:
    return owner if shards == 1 else f"{owner}.shard-{shard + 1}-of-{shards}"


def train_members(
    grid: Grid,
    strategy: OffsiteMixin,
    cfg: FederationConfig,
    public_start: dict[str, torch.Tensor],
    emulator_hash: str,
    split: str,
) -> tuple[list[Member], list[dict[str, str]]]:
    """Ask every connected owner for its members; the accepted members and the reasons for the rest."""
    config = ConfigRecord(
        {
            TRACK: MEMBER_TRACK,
            EMULATOR_HASH: emulator_hash,
            EMBEDDINGS_KEYED: False,
            SERVER_ROUND: strategy.round_offset + cfg.num_server_rounds + 1,
        }
    )
    messages = []
    for node in grid.get_node_ids():
        content = RecordDict({ARRAYS: to_arrays(public_start), CONFIG: config})
        if node not in strategy.nodes_with_emulator:
            content[EMULATOR], content[EMULATOR_MANIFEST] = strategy.emulator_records
        messages.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node))
    members, refused = [], []
    for reply in grid.send_and_receive(messages, timeout=cfg.round_timeout):
        node = reply.metadata.src_node_id
        outcome = _members_of(reply, strategy, cfg, public_start, split)
        if isinstance(outcome, str):
            log.warning("members from node %s refused: %s", node, outcome)
            refused.append({"node": str(node), "reason": outcome})
        else:
            members.extend(outcome)
    return members, refused


def _members_of(
    reply: Message, strategy: OffsiteMixin, cfg: FederationConfig, public_start: dict[str, torch.Tensor], split: str
) -> list[Member] | str:
    """A reply's members, or why none of them is accepted."""
    reason = decline_reason(reply)
    if reason is not None:
        return reason
    owner = reply.content.config_records.get(OWNER)
    name = strategy._owner_name(reply.metadata.src_node_id, str(owner.get("name", "")) if owner else "")
    if not isinstance(name, str):
        return name.reason
    keys = list(reply.content.array_records)
    shards = {shard: key for key in keys if (shard := member_shard(key)) is not None}
    if len(shards) != len(keys) or set(shards) != set(range(cfg.member_shards)):
        return f"expected member records {member_key(0)}..{member_key(cfg.member_shards - 1)}, got {sorted(keys)}"
    members = []
    for shard, key in sorted(shards.items()):
        try:
            state = from_arrays(reply.content.array_records[key])
        except Exception as err:  # an undecodable payload is the client's fault, not the server's
            return f"{key} could not be decoded: {err}"
        # Members are not aggregated, so no update bound applies; names, shapes, dtypes and finiteness do.
        problem = check_update(state, public_start, math.inf)
        if problem is not None:
            return f"{key}: {problem}"
        depends_on = DependsOn((name,), shard, cfg.member_shards, split)
        members.append(Member(member_name(name, shard, cfg.member_shards), state, depends_on))
    return members
