import pytest
import torch

from privtune.common.checkpoint import load_checkpoint, remove_checkpoint, save_checkpoint
from privtune.common.errors import PrivtuneError

FINGERPRINT = {"config": {"steps": 10, "lr": 1e-3}, "shape": (4, 8)}


def test_save_then_load_gives_the_latest_step_and_keeps_only_it(tmp_path):
    path = tmp_path / "ckpt"
    assert load_checkpoint(path, "fmt/1", FINGERPRINT, "test") is None
    for step in (2, 4):
        save_checkpoint(path, "fmt/1", step, FINGERPRINT, {"w": torch.full((3,), float(step))})
    found = load_checkpoint(path, "fmt/1", FINGERPRINT, "test")
    assert found is not None and found.step == 4 and torch.equal(found.state["w"], torch.full((3,), 4.0))
    assert sorted(p.name for p in path.iterdir()) == ["step-000000004"]
    remove_checkpoint(path)
    assert not path.exists()


def test_an_unfinished_save_is_ignored(tmp_path):
    """A crash before the rename leaves a temporary folder; the previous complete step is used."""
    path = tmp_path / "ckpt"
    save_checkpoint(path, "fmt/1", 3, FINGERPRINT, {"w": torch.ones(2)})
    (path / ".tmp-6").mkdir()
    (path / ".tmp-6" / "state.pt").write_bytes(b"half")
    found = load_checkpoint(path, "fmt/1", FINGERPRINT, "test")
    assert found is not None and found.step == 3
    save_checkpoint(path, "fmt/1", 6, FINGERPRINT, {"w": torch.zeros(2)})  # the stale temporary is replaced
    assert sorted(p.name for p in path.iterdir()) == ["step-000000006"]


def test_other_settings_a_damaged_step_and_a_file_are_refused(tmp_path):
    path = tmp_path / "ckpt"
    save_checkpoint(path, "fmt/1", 1, FINGERPRINT, {"w": torch.ones(1)})
    with pytest.raises(PrivtuneError, match="another model, table or corpus"):
        load_checkpoint(path, "fmt/1", {**FINGERPRINT, "shape": (4, 9)}, "test", "model, table or corpus")
    with pytest.raises(PrivtuneError, match="another"):
        load_checkpoint(path, "fmt/2", FINGERPRINT, "test")
    (path / "step-000000001" / "state.pt").write_bytes(b"not a torch file")
    with pytest.raises(PrivtuneError, match="unreadable.*delete"):
        load_checkpoint(path, "fmt/1", FINGERPRINT, "test")
    file = tmp_path / "old.ckpt"
    file.write_bytes(b"x")
    with pytest.raises(PrivtuneError, match="not a checkpoint folder"):
        load_checkpoint(file, "fmt/1", FINGERPRINT, "test")
    with pytest.raises(PrivtuneError, match="is a file"):
        save_checkpoint(file, "fmt/1", 1, FINGERPRINT, {})
