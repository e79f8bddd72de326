import json
import math

import pytest
import torch

from privtune.common.errors import PrivtuneError
from privtune.server.run_folder import Checkpoint, RunFolder


def test_checkpoint_round_trip_and_overwrite(tmp_path):
    folder = RunFolder(tmp_path)
    assert folder.load_checkpoint() is None
    folder.save_checkpoint(Checkpoint(1, {"w": torch.ones(2)}, [{"round": 1}], {"hash": "abc"}))
    folder.save_checkpoint(Checkpoint(2, {"w": torch.full((2,), 2.0)}, [{"round": 1}, {"round": 2}], {"hash": "abc"}))
    loaded = folder.load_checkpoint()
    assert loaded.round == 2 and torch.equal(loaded.adapter["w"], torch.full((2,), 2.0))
    assert [r["round"] for r in loaded.history] == [1, 2] and loaded.extra == {"hash": "abc"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    moments = {"m_t/w": torch.ones(2, dtype=torch.float64), "v_t/w": torch.zeros(2, dtype=torch.float64)}
    folder.save_checkpoint(Checkpoint(3, {"w": torch.ones(2)}, optimizer=moments))
    assert folder.load_checkpoint().optimizer.keys() == moments.keys()
    folder.save_checkpoint(Checkpoint(4, {"w": torch.ones(2)}))  # FedAvg from here: no stale moments
    assert folder.load_checkpoint().optimizer == {}


def test_corrupt_checkpoint_names_the_folder(tmp_path):
    folder = RunFolder(tmp_path)
    folder.save_checkpoint(Checkpoint(1, {"w": torch.ones(2)}))
    (folder.checkpoint_dir / "adapter.safetensors").write_bytes(b"garbage")
    with pytest.raises(PrivtuneError, match="checkpoint.*unreadable"):
        folder.load_checkpoint()


def test_metrics_are_strict_json_and_plots_are_written(tmp_path):
    folder = RunFolder(tmp_path)
    rounds = [
        {"round": 1, "loss": 2.0, "plugin_ppl": math.nan, "emulator_adapter_ppl": 5.0, "privacy": {}},
        {"round": 2, "loss": 1.5, "plugin_ppl": 4.0, "emulator_adapter_ppl": 4.5, "privacy": {}},
    ]
    folder.write_metrics({"zero_shot_ppl": math.inf, "rounds": rounds})
    text = (tmp_path / "metrics.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text)["rounds"][0]["plugin_ppl"] is None
    assert (tmp_path / "metrics.csv").read_text().splitlines()[0] == "round,loss,plugin_ppl,emulator_adapter_ppl"
    written = folder.write_plots(rounds, {"owner-0": {"dp-epsilon": 1.0}, "owner-1": {}})
    assert [p.name for p in written] == ["training.png", "privacy.png"]
