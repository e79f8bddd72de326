"""The model owner's strategy facing hostile data owners: names that are paths or someone else's,
and example counts that claim the whole aggregate. Real Flower strategies and messages."""

from __future__ import annotations

import time

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict

from privtune.common.federation.config import FederationConfig
from privtune.common.federation.records import (
    ARRAYS,
    EMULATOR_UNAVAILABLE,
    METRICS,
    NUM_EXAMPLES,
    OWNER,
    declined,
    from_arrays,
    to_arrays,
)
from privtune.server.strategy import make_strategy

REFERENCE = {"w": torch.zeros(4)}
BUDGET = "privacy budget exhausted"


def strategy(**run_config):
    made = make_strategy(
        FederationConfig.from_run_config({"min-train-nodes": 1, **run_config}), (ArrayRecord(), ConfigRecord())
    )
    made._reference = dict(REFERENCE)
    return made


def reply(node: int, update: torch.Tensor, owner: str | None = None, examples: float = 100.0) -> Message:
    content = RecordDict({ARRAYS: to_arrays({"w": update}), METRICS: MetricRecord({NUM_EXAMPLES: examples})})
    if owner is not None:
        content[OWNER] = ConfigRecord({"name": owner})
    return message_from(node, content)


def message_from(node: int, content: RecordDict) -> Message:
    metadata = Metadata(
        run_id=1,
        message_id=f"m{node}",
        src_node_id=node,
        dst_node_id=0,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=60.0,
        message_type="train",
    )
    return Message(content=content, metadata=metadata)


def accepted_names(strategy, server_round):
    entry = strategy.rounds[server_round]
    return {node: entry.owner_names[node] for node in entry.accepted}


def aggregate(strategy, replies, server_round=1):
    arrays, _ = strategy.aggregate_train(server_round, replies)
    return from_arrays(arrays)["w"] if arrays is not None else None


@pytest.mark.parametrize(
    "name", ["../../../../tmp/x", "/tmp/x", "a/b", "..", ".hidden", "", "x" * 65, "aggregate", "node-3"]
)
def test_a_name_that_is_a_path_or_reserved_is_refused(name):
    s = strategy()
    result = aggregate(s, [reply(1, torch.ones(4), name), reply(2, torch.full((4,), 3.0), "bob")])
    assert torch.equal(result, torch.full((4,), 3.0))  # only bob's update counts
    assert accepted_names(s, 1) == {2: "bob"}
    assert [r.node_id for r in s.rounds[1].rejected] == [1]
    assert "owner name" in s.rounds[1].rejected[0].reason


def test_a_name_is_bound_to_the_node_that_first_reported_it():
    s = strategy()
    aggregate(s, [reply(1, torch.ones(4), "alice"), reply(2, torch.ones(4), "bob")])
    # Node 3 claims alice's name: it is told apart, alice's member is not replaced.
    aggregate(s, [reply(3, torch.full((4,), 9.0), "alice"), reply(1, torch.ones(4), "alice")], server_round=2)
    assert accepted_names(s, 2) == {1: "alice", 3: "alice@node-3"}
    # Node 2 renames itself to become a second member: refused.
    aggregate(s, [reply(2, torch.ones(4), "carol"), reply(1, torch.ones(4), "alice")], server_round=3)
    assert accepted_names(s, 3) == {1: "alice"}
    assert "earlier in this run" in s.rounds[3].rejected[0].reason


def test_one_owner_cannot_take_over_the_aggregate_by_claiming_more_examples():
    """An update of norm 50 (under the default clip of 100) claiming 1e9 examples against two honest
    owners claiming 100: with equal weights (the default) it moves the aggregate by a third."""
    honest = [reply(1, torch.zeros(4), "alice"), reply(2, torch.zeros(4), "bob")]
    attack = reply(3, torch.full((4,), 25.0), "mallory", examples=1e9)  # norm 50
    assert torch.allclose(aggregate(strategy(), [*honest, attack]), torch.full((4,), 25.0 / 3))
    capped = strategy(**{"max-examples-per-owner": 200})
    assert torch.allclose(aggregate(capped, [*honest, attack]), torch.full((4,), 25.0 * 200 / 400))


def test_declared_sizes_weigh_within_the_cap():
    small, large = reply(1, torch.zeros(4), "alice", examples=50), reply(2, torch.full((4,), 4.0), "bob", examples=150)
    assert torch.allclose(
        aggregate(strategy(**{"max-examples-per-owner": 1000}), [small, large]), torch.full((4,), 3.0)
    )
    assert strategy().rounds == {}  # each strategy keeps its own bookkeeping


def test_an_owner_that_lost_its_emulator_is_sent_it_again():
    s = strategy()
    aggregate(s, [reply(1, torch.ones(4), "alice"), reply(2, torch.ones(4), "bob")])
    assert s.nodes_with_emulator == {1, 2}
    # Node 2's cache was wiped: it declines for the emulator, and the next round carries it again.
    aggregate(s, [reply(1, torch.ones(4), "alice"), message_from(2, declined(EMULATOR_UNAVAILABLE))], server_round=2)
    assert s.nodes_with_emulator == {1}
    aggregate(s, [reply(1, torch.ones(4), "alice"), message_from(2, declined(BUDGET))], server_round=3)
    assert s.nodes_with_emulator == {1, 2}  # a budget decline comes after the emulator was cached
