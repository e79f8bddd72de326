"""What a data owner's train replies carry in each privacy mode, and what its ledger records."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ConfigRecord, RecordDict

from privtune.client.app import train_reply
from privtune.client.site import SiteConfig, site_documents
from privtune.client.trainer import OwnerTrainer
from privtune.common.errors import PrivtuneError
from privtune.common.federation.config import FederationConfig
from privtune.common.federation.records import (
    ARRAYS,
    CONFIG,
    EMULATOR,
    EMULATOR_HASH,
    EMULATOR_MANIFEST,
    MEMBER_TRACK,
    METRICS,
    OWNER,
    SERVER_ROUND,
    TRACK,
    from_arrays,
    manifest_record,
    to_arrays,
)
from privtune.common.ledger import Ledger
from privtune.common.models import load_model
from privtune.common.offsite import OffsiteConfig, adapter_state
from privtune.common.offsite.package import EmulatorPackage

MODES = {
    "none": {},
    "ldp": {"ldp-epsilon": 20.0, "ldp-embedding": "tiny"},
    "dpsgd": {"dp-epsilon": 8.0},
    "both": {"ldp-epsilon": 20.0, "ldp-embedding": "tiny", "dp-epsilon": 8.0},
}
PLAIN_METRICS = {"num-examples", "train-loss", "train-seconds", "train-tokens"}
LDP_METRICS = {"ldp-epsilon-token", "ldp-epsilon-document-max"}
EXPECTED_METRICS = {
    "none": PLAIN_METRICS,
    "ldp": PLAIN_METRICS | LDP_METRICS,
    "dpsgd": {"num-examples"},
    "both": {"num-examples", "ldp-epsilon-token"},
}


@pytest.fixture(scope="module")
def package() -> EmulatorPackage:
    offsite = OffsiteConfig(k_bottom=1, k_top=1, n_emulator=2, adapter="lora", lora_r=4, lora_alpha=8)
    return EmulatorPackage.build(load_model("tiny-llama").model, offsite)


def owner(tmp_path, mode: str) -> OwnerTrainer:
    cfg = FederationConfig.from_run_config(
        {
            "num-server-rounds": 1,
            "local-steps": 2,
            "batch-size": 4,
            "block-size": 32,
            "max-train-blocks": 16,
            "member-shards": 2,
            "member-steps": 2,
            "lora-r": 4,
            "run-dir": str(tmp_path / "server"),
            **MODES[mode],
        }
    )
    return OwnerTrainer(SiteConfig.from_node_config({"partition-id": 0, "num-partitions": 2}, cfg), cfg)


def request(package: EmulatorPackage, track: dict) -> RecordDict:
    """What the server sends: the starting adapter, the round's config, and the emulator the first time."""
    tensors, manifest = package.to_parts()
    return RecordDict(
        {
            ARRAYS: to_arrays(adapter_state(package.instantiate(seed=0))),
            CONFIG: ConfigRecord({EMULATOR_HASH: package.content_hash, **track}),
            EMULATOR: to_arrays(tensors),
            EMULATOR_MANIFEST: manifest_record(manifest),
        }
    )


def shape(content: RecordDict) -> dict[str, set[str]]:
    """Every record of a message by name, with the keys it holds."""
    return {name: set(record) for name, record in content.items()}


@pytest.mark.parametrize("mode", MODES)
def test_a_round_releases_only_what_its_privacy_mode_covers(tmp_path, package, mode):
    trainer = owner(tmp_path, mode)
    trainer.receive_emulator(request(package, {}))
    federated = train_reply(trainer, request(package, {SERVER_ROUND: 1}))
    assert shape(federated) == {
        ARRAYS: set(federated[ARRAYS]),
        METRICS: EXPECTED_METRICS[mode],
        OWNER: {"name"},
    }
    assert set(federated[ARRAYS]) == set(adapter_state(package.instantiate(seed=0)))
    if "dp-epsilon" in MODES[mode]:
        assert federated[METRICS]["num-examples"] == 1.0  # the count is private; owners weigh equally
    members = train_reply(trainer, request(package, {TRACK: MEMBER_TRACK, SERVER_ROUND: 2}))
    assert shape(members) == {"member-0": set(federated[ARRAYS]), "member-1": set(federated[ARRAYS]), OWNER: {"name"}}
    first, second = (from_arrays(members[key]) for key in ("member-0", "member-1"))
    assert any(not torch.equal(first[name], second[name]) for name in first), "two shards gave the same member"
    if trainer.cfg.private:
        with pytest.raises(PrivtuneError, match="evaluation withheld"):
            trainer.evaluate(adapter_state(package.instantiate(seed=0)), {})
    else:
        assert set(trainer.evaluate(adapter_state(package.instantiate(seed=0)), {})) == {"num-examples", "eval-loss"}
    report = Ledger(trainer.site.ledger_path, create=False).report() if trainer.site.ledger_path.exists() else None
    kinds = {g["kind"] for g in report["guarantees"]} if report else set()
    assert kinds == {
        k for k, on in (("ldp", "ldp-epsilon" in MODES[mode]), ("dpsgd", "dp-epsilon" in MODES[mode])) if on
    }


def test_dpsgd_charges_both_tracks_and_reaches_the_target_exactly(tmp_path, package):
    trainer = owner(tmp_path, "dpsgd")
    trainer.receive_emulator(request(package, {}))
    train_reply(trainer, request(package, {SERVER_ROUND: 1}))
    train_reply(trainer, request(package, {TRACK: MEMBER_TRACK, SERVER_ROUND: 2}))
    records = Ledger(trainer.site.ledger_path, create=False).records("dpsgd")
    assert [(r.details["release"], r.details["part"]) for r in records] == [
        ("federated adapter", "round 1"),
        ("PMixED member", "shard 1 of 2, from the public start"),
        ("PMixED member", "shard 2 of 2, from the public start"),
    ]
    # record-level on both tracks: the embedded corpus's paragraphs are the records, sampled at the public rate
    data = trainer.data()
    assert {r.details["unit"] for r in records} == {"record"} and data.unit.name == "record"
    assert [r.details["sample_rate"] for r in records] == [trainer.cfg.dp_sample_rate] * 3
    works = len(site_documents(trainer.site, trainer.cfg.seed))
    assert len(data.train) == sum(len(s) for s in data.shards) > 2 * works  # paragraphs, not whole works
    dpsgd = next(
        g for g in Ledger(trainer.site.ledger_path, create=False).report()["guarantees"] if g["kind"] == "dpsgd"
    )
    assert dpsgd["unit"] == "record" and "paragraph" in dpsgd["statement"] and "first 256 tokens" in dpsgd["statement"]
    assert dpsgd["releases_covered"] == ["PMixED member", "federated adapter"]
    assert "covers: PMixED member, federated adapter" in dpsgd["statement"]
    assert 8.0 * 0.99 < records[-1].total <= 8.0 * (1 + 1e-9)
    # the plan is spent: one more round is refused, not trained
    with pytest.raises(PrivtuneError, match="refused"):
        train_reply(trainer, request(package, {SERVER_ROUND: 2}))
