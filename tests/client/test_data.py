"""A data owner's training examples per DP-SGD unit: records (documents or paragraphs) or token blocks."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from privtune.client.data import describe, load_owner_data, owner_tokenizer, paragraphs, records_kind
from privtune.client.private_training import dp_schedule
from privtune.client.site import SiteConfig, site_documents
from privtune.common.corpus import Document
from privtune.common.dpsgd import PAD, DpSgdConfig, epsilon_for, noise_multiplier_for
from privtune.common.errors import PrivtuneError
from privtune.common.federation.config import FederationConfig

RUN = {"model": "tiny-llama", "block-size": 32, "max-train-blocks": 16, "batch-size": 4, "dp-epsilon": 8.0}


def owner_data(tmp_path, node: dict, **run):
    cfg = FederationConfig.from_run_config({**RUN, "run-dir": str(tmp_path / "server"), **run})
    site = SiteConfig.from_node_config(node, cfg)
    return cfg, site, load_owner_data(site, cfg, owner_tokenizer(site, cfg))


def real_lengths(rows):
    return (rows.ids != PAD).sum(dim=1)


def test_the_embedded_corpus_trains_one_row_per_paragraph_capped(tmp_path):
    run = {"dp-record-max-tokens": 24, "max-train-blocks": 128}
    cfg, site, data = owner_data(tmp_path, {"partition-id": 0, "num-partitions": 2}, **run)
    assert records_kind(cfg, site) == "paragraphs" and data.unit.name == "record"
    works = len(site_documents(site, cfg.seed))
    assert len(data.train) > 4 * works and data.train.shape[1] == 24
    assert int(real_lengths(data.train).min()) >= 2 and int(real_lengths(data.train).max()) == 24
    assert json.loads(describe(data))["unit"] == "record"


def test_a_data_folder_trains_one_row_per_document_or_jsonl_line(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text("First paragraph of a.\n\nSecond paragraph of a, longer than the first.\n")
    lines = [{"text": f"line {i}: " + "words " * (5 + i)} for i in range(6)]
    (folder / "b.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    node = {"data-path": str(folder), "workspace": str(tmp_path / "ws")}
    cfg, site, data = owner_data(tmp_path, node)
    assert records_kind(cfg, site) == "documents" and len(data.train) == 7  # one file, six lines
    _, _, by_paragraph = owner_data(tmp_path, node, **{"dp-records": "paragraphs"})
    assert len(by_paragraph.train) == 8
    _, _, blocks = owner_data(tmp_path, node, **{"dp-unit": "block"})
    assert blocks.unit.name == "training block (32 tokens)" and blocks.train.shape[1] == 32
    assert bool((blocks.train.ids != PAD).all())


def test_paragraph_records_under_ldp_are_refused_and_auto_takes_documents(tmp_path):
    node = {"partition-id": 0, "num-partitions": 2}
    cfg = FederationConfig.from_run_config({**RUN, "ldp-epsilon": 20.0, "dp-records": "paragraphs"})
    with pytest.raises(PrivtuneError, match="LDP does not cover"):
        records_kind(cfg, SiteConfig.from_node_config(node, cfg))
    auto = FederationConfig.from_run_config({**RUN, "ldp-epsilon": 20.0})
    assert records_kind(auto, SiteConfig.from_node_config(node, auto)) == "documents"


def test_paragraphs_are_cut_at_blank_lines():
    text = "PAINTER.\nA picture, sir.\n\nPOET.\nUpon the heels.\n  \n\n\nEnd."
    assert paragraphs(Document("w", text)) == ["PAINTER.\nA picture, sir.", "POET.\nUpon the heels.", "End."]


def test_noise_planned_over_both_record_tracks_reaches_the_target(tmp_path):
    cfg, _, data = owner_data(
        tmp_path, {"partition-id": 1, "num-partitions": 2}, **{"member-shards": 3, "local-steps": 30}
    )
    schedule = dp_schedule(cfg, data)
    assert [q for q, _ in schedule] == [cfg.dp_sample_rate] * (1 + len(data.shards)) and len(data.shards) == 3
    config = DpSgdConfig(target_epsilon=8.0, delta=cfg.dp_delta, schedule=schedule)
    sigma = noise_multiplier_for(config, schedule[0][0])
    assert 0.99 * 8.0 <= epsilon_for([(sigma, q, n) for q, n in schedule], cfg.dp_delta) <= 8.0


def test_the_schedule_is_the_same_for_an_owner_with_one_record_less(tmp_path):
    """q and the steps are public settings: removing a record (add/remove adjacency) changes nothing accounted."""
    cfg, _, data = owner_data(tmp_path, {"partition-id": 0, "num-partitions": 2}, **{"member-shards": 2})
    fewer = replace(data, train=data.train[1:], shards=[data.shards[0][1:], *data.shards[1:]])
    assert dp_schedule(cfg, fewer) == dp_schedule(cfg, data)
    assert (
        dp_schedule(cfg, data)
        == ((cfg.dp_sample_rate, cfg.num_server_rounds * cfg.local_steps),)
        + ((cfg.dp_sample_rate, cfg.member_track_steps),) * 2
    )


def test_a_renamed_or_moved_document_keeps_its_ldp_budget(tmp_path):
    from privtune.common.ledger import Ledger

    text = "The quality of mercy is not strained. " * 40
    spent = []
    for i, name in enumerate(("a.txt", "renamed.txt")):
        folder = tmp_path / f"texts-{i}"
        folder.mkdir()
        (folder / name).write_text(text)
        node = {"data-path": str(folder), "workspace": str(tmp_path / "ws")}
        _, site, _ = owner_data(tmp_path, node, **{"ldp-epsilon": 1.0, "ldp-embedding": "tiny", "dp-epsilon": 0.0})
        report = Ledger(site.ledger_path, read_only=True).report()
        ldp = next(g for g in report["guarantees"] if g["kind"] == "ldp")
        spent.append((ldp["subjects"], ldp["spent"]))
    assert spent[0][0] == spent[1][0] == 1  # one document, one subject
    assert spent[1][1] == pytest.approx(2 * spent[0][1])


def chat_folder(tmp_path, n: int = 10):
    folder = tmp_path / "chats"
    folder.mkdir()
    lines = [{"prompt": f"What is {i} plus {i}?", "response": f"It is {2 * i}, my friend."} for i in range(n)]
    (folder / "chat.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    return folder, lines


def test_a_chat_jsonl_trains_one_record_per_line_on_its_responses(tmp_path):
    from privtune.common.text_tokenizer import ByteTokenizer
    from privtune.common.tokens import IGNORE

    folder, lines = chat_folder(tmp_path)
    node = {"data-path": str(folder), "workspace": str(tmp_path / "ws")}
    cfg, _, data = owner_data(tmp_path, node, **{"dp-records": "paragraphs"})  # a conversation is never cut
    assert len(data.train) == 9 and len(data.heldout) >= 1  # the last line is held out whole
    tok = ByteTokenizer()
    for row, line in zip(range(len(data.train)), lines, strict=False):
        real = data.train.ids[row][data.train.ids[row] != PAD].tolist()
        assert tok.decode(real) == f"User: {line['prompt']}\nAssistant: {line['response']}"
        labels = data.train.labels[row]
        assert tok.decode(labels[labels != IGNORE].tolist()) == line["response"]  # and its eos
    assert dp_schedule(cfg, data)[0][0] == cfg.dp_sample_rate  # public, not batch / 9 records


def test_ldp_perturbs_prompt_and_response_and_charges_the_line(tmp_path):
    from privtune.common.ledger import Ledger

    folder, lines = chat_folder(tmp_path)
    node = {"data-path": str(folder), "workspace": str(tmp_path / "ws")}
    run = {"ldp-epsilon": 1.0, "ldp-embedding": "tiny", "dp-epsilon": 0.0}
    _, site, data = owner_data(tmp_path, node, **run)
    cache = json.loads(next((site.workspace / "ldp").glob("*.json")).read_text())
    perturbed = cache["documents"]
    assert len(perturbed) == 9 and all([r for r, _ in d["turns"]] == ["user", "assistant"] for d in perturbed)
    originals = [(line["prompt"], line["response"]) for line in lines[:9]]
    assert all((d["turns"][0][1], d["turns"][1][1]) != o for d, o in zip(perturbed, originals, strict=True))
    report = Ledger(site.ledger_path, read_only=True).report()
    ldp = next(g for g in report["guarantees"] if g["kind"] == "ldp")
    assert ldp["subjects"] == 9  # one subject per line: its prompt's and its response's releases add up
    from privtune.common.ldp.embedding import load_embedding

    space = load_embedding("tiny")
    tokens = max(len(space.encode(prompt)) + len(space.encode(response)) for prompt, response in originals)
    assert data.ldp["ldp-epsilon-document-max"] == pytest.approx(tokens * data.ldp["ldp-epsilon-token"])
