"""``privtune simulate`` over owners' own folders of chat ``.jsonl``: a real Flower simulation on a tiny
model, the owners training under DP-SGD one record per conversation, on its responses."""

from __future__ import annotations

import json

import pytest

from privtune.cli import main
from privtune.common.federation.config import FederationConfig
from privtune.common.ledger import Ledger

TINY = ["--rounds", "1", "--local-steps", "2", "--set", "block-size=32", "--set", "batch-size=4"]


def chat_folder(root, owner: int, n: int = 12):
    folder = root / f"owner-{owner}"
    folder.mkdir(parents=True)
    lines = [
        {
            "messages": [
                {"role": "user", "content": f"Owner {owner}, what is {i} + 1?"},
                {"role": "assistant", "content": f"{i + 1}."},
            ]
        }
        for i in range(n)
    ]
    (folder / "chat.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    return folder


@pytest.mark.slow
def test_simulate_trains_owners_on_their_chat_jsonl(tmp_path, capsys):
    folders = [chat_folder(tmp_path / "data", i) for i in range(2)]
    out = tmp_path / "run"
    argv = ["simulate", "--owners", "2", *TINY, "--dp-epsilon", "8", "--out", str(out)]
    assert main([*argv, *(arg for folder in folders for arg in ("--data", str(folder)))]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    (row,) = metrics["rounds"]
    assert row["accepted"] == 2, row
    for i in range(2):
        records = Ledger(out / "owners" / f"owner-{i}" / "ledger.sqlite").records("dpsgd")
        assert {r.details["release"] for r in records} == {"federated adapter", "PMixED member"}
        # 12 lines, the last held out whole: 11 records, one per conversation, on both tracks.
        assert all(r.details["unit"] == "record" for r in records)
        assert all(r.details["sample_rate"] == FederationConfig.dp_sample_rate for r in records)  # public, not 4 / 11


def test_simulate_wants_one_data_folder_per_owner(tmp_path, capsys):
    folder = chat_folder(tmp_path / "data", 0)
    assert main(["simulate", "--owners", "2", *TINY, "--data", str(folder), "--out", str(tmp_path / "run")]) == 2
    assert "one folder per owner" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
