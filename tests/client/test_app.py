"""The data owner's ClientApp facing a model owner it does not trust: a hostile emulator hash must not
touch files outside the emulator cache, and a decline must not describe the site."""

from __future__ import annotations

import re
import time

import pytest
from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict

from privtune.client.app import BUDGET_REASON, PUBLIC_REASONS, handle_train
from privtune.common.federation.records import (
    ARRAYS,
    CONFIG,
    EMULATOR,
    EMULATOR_MANIFEST,
    STATUS,
    manifest_record,
    to_arrays,
)
from privtune.common.models import load_model
from privtune.common.offsite import EmulatorPackage, OffsiteConfig, adapter_state

RUN = {"model": "tiny-llama", "local-steps": 2, "batch-size": 2, "block-size": 32, "max-train-blocks": 8}


@pytest.fixture(scope="module")
def package() -> EmulatorPackage:
    return EmulatorPackage.build(load_model("tiny-llama").model, OffsiteConfig(k_bottom=1, k_top=1, n_emulator=2))


@pytest.fixture
def site(tmp_path):
    """A site laid out as a data owner might have it: its texts, a web app, the privtune workspace."""
    texts = tmp_path / "private-texts-of-acme"
    texts.mkdir()
    (texts / "letters.txt").write_text("To be, or not to be, that is the question. " * 40)
    webapp = tmp_path / "webapp"
    webapp.mkdir()
    (webapp / "manifest.json").write_text('{"name": "the owner\'s web app"}')
    return {"data-path": str(texts), "workspace": str(tmp_path / "workspace"), "owner": "acme"}


def train_message(package: EmulatorPackage, emulator_hash: str, attach: bool) -> Message:
    content = RecordDict(
        {
            ARRAYS: to_arrays(adapter_state(package.instantiate(seed=0))),
            CONFIG: ConfigRecord({"emulator-hash": emulator_hash, "server-round": 1}),
        }
    )
    if attach:
        tensors, manifest = package.to_parts()
        content[EMULATOR], content[EMULATOR_MANIFEST] = to_arrays(tensors), manifest_record(manifest)
    metadata = Metadata(
        run_id=1,
        message_id="instruction",
        src_node_id=0,
        dst_node_id=1,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=600.0,
        message_type="train",
    )
    return Message(content=content, metadata=metadata)


def train(message: Message, node_config: dict, **run_config) -> RecordDict:
    context = Context(
        run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={**RUN, **run_config}
    )
    return handle_train(message, context, {}, {}).content


def reason(content: RecordDict) -> str:
    return str(content.config_records[STATUS]["reason"])


@pytest.mark.parametrize("hostile", ["../webapp", "../../webapp", "/tmp", "..", "0" * 63 + "/"])
def test_a_hostile_emulator_hash_deletes_nothing_and_is_declined(package, site, tmp_path, hostile):
    content = train(train_message(package, hostile, attach=False), site)
    assert reason(content) == PUBLIC_REASONS["emulator"]
    assert (tmp_path / "webapp" / "manifest.json").exists()
    assert (tmp_path / "private-texts-of-acme" / "letters.txt").exists()


def test_a_cache_entry_linking_elsewhere_is_not_followed(package, site, tmp_path):
    cache = tmp_path / "workspace" / "emulators"
    cache.mkdir(parents=True)
    (cache / package.content_hash).symlink_to(tmp_path / "webapp")
    content = train(train_message(package, package.content_hash, attach=False), site)
    assert reason(content) == PUBLIC_REASONS["emulator"]
    assert (tmp_path / "webapp" / "manifest.json").exists()


def test_a_decline_names_the_failed_step_not_the_site(package, site, tmp_path):
    missing = {**site, "data-path": str(tmp_path / "private-texts-of-acme" / "2024" / "hr-records")}
    content = train(train_message(package, package.content_hash, attach=True), missing)
    assert reason(content) == PUBLIC_REASONS["training"]
    assert "acme" not in repr(dict(content.config_records[STATUS])) and not re.search(r"\d", reason(content))


def test_a_budget_decline_says_budget_and_no_figures(package, site):
    content = train(
        train_message(package, package.content_hash, attach=True),
        {**site, "dp-budget": 0.01},
        **{"dp-epsilon": 1.0, "dp-unit": "block"},  # the site holds one record: too few for a record-level batch
    )
    assert reason(content) == BUDGET_REASON


def test_an_honest_round_trains(package, site):
    content = train(train_message(package, package.content_hash, attach=True), site)
    assert STATUS not in content.config_records and ARRAYS in content.array_records
