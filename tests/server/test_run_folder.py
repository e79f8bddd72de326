import functools
import json
import math

import pytest
import torch

from privtune.common.errors import PrivtuneError
from privtune.common.federation.config import FederationConfig
from privtune.server.run_folder import Checkpoint, RunFolder, run_identity


@functools.cache
def owner_adapter() -> tuple[dict[str, torch.Tensor], dict]:
    """A real (tiny) adapter state and manifest: the run folder writes it as a checked peft folder."""
    from privtune.common.models import tiny_model
    from privtune.common.offsite import EmulatorPackage, OffsiteConfig, adapter_manifest, adapter_state

    cfg = OffsiteConfig(k_bottom=1, k_top=1, n_emulator=1, lora_r=2)
    model = EmulatorPackage.build(tiny_model("llama"), cfg).instantiate()
    return adapter_state(model), adapter_manifest(model).to_dict()


def test_checkpoint_round_trip_and_overwrite(tmp_path):
    folder = RunFolder(tmp_path)
    assert folder.load_checkpoint() is None
    folder.save_checkpoint(Checkpoint(1, {"w": torch.ones(2)}, [{"round": 1}], {"hash": "abc"}))
    folder.save_checkpoint(Checkpoint(2, {"w": torch.full((2,), 2.0)}, [{"round": 1}, {"round": 2}], {"hash": "abc"}))
    loaded = folder.load_checkpoint()
    assert loaded.round == 2 and torch.equal(loaded.adapter["w"], torch.full((2,), 2.0))
    assert [r["round"] for r in loaded.history] == [1, 2] and loaded.extra == {"hash": "abc"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "checkpoints"]
    assert len(list((tmp_path / "checkpoints").iterdir())) == 1
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


class Killed(BaseException):
    """A crash: not an Exception, so no handler in the code under test can swallow it."""


def crash_at(monkeypatch, step: int) -> list[str]:
    """Make the ``step``-th file-system change of the code under test kill it; returns the steps seen."""
    import os
    import pathlib
    import shutil

    import privtune.server.run_folder as run_folder

    seen: list[str] = []

    def lethal(name, real):
        def call(*args, **kwargs):
            seen.append(name)
            if len(seen) == step:
                raise Killed(name)
            return real(*args, **kwargs)

        return call

    monkeypatch.setattr(run_folder, "save_file", lethal("save_file", run_folder.save_file))
    for module, name in [
        (os, "replace"),
        (os, "symlink"),
        (os, "fsync"),
        (shutil, "rmtree"),
        (pathlib.Path, "mkdir"),
        (pathlib.Path, "write_text"),
        (pathlib.Path, "unlink"),
    ]:
        monkeypatch.setattr(module, name, lethal(f"{module.__name__}.{name}", getattr(module, name)))
    return seen


def test_a_crash_at_any_step_of_a_checkpoint_leaves_a_complete_one(tmp_path, monkeypatch):
    """Every file-system step of save_checkpoint killed in turn: the next start loads round 1 or 2
    (never nothing, never a mix), and the next save succeeds and leaves no debris."""
    step = 0
    while True:
        step += 1
        root = tmp_path / f"crash-{step}"
        RunFolder(root).save_checkpoint(Checkpoint(1, {"w": torch.ones(2)}, [{"round": 1}]))
        with monkeypatch.context() as patch:
            seen = crash_at(patch, step)
            try:
                RunFolder(root).save_checkpoint(
                    Checkpoint(
                        2, {"w": torch.full((2,), 2.0)}, [{"round": 1}, {"round": 2}], optimizer={"m": torch.ones(1)}
                    )
                )
            except Killed:
                crashed = True
            else:
                crashed = False
        survivor = RunFolder(root).load_checkpoint()
        assert survivor is not None and survivor.round in (1, 2), (step, seen)
        assert torch.equal(survivor.adapter["w"], torch.full((2,), float(survivor.round)))
        assert len(survivor.history) == survivor.round
        if "os.replace" in seen[:-1] or not crashed:  # the link was switched before the crash
            assert survivor.round == 2
        RunFolder(root).save_checkpoint(Checkpoint(3, {"w": torch.full((2,), 3.0)}, [{}, {}, {}]))
        assert RunFolder(root).load_checkpoint().round == 3
        assert sorted(p.name for p in root.iterdir()) == ["checkpoint", "checkpoints"]
        assert len(list((root / "checkpoints").iterdir())) == 1
        if not crashed:
            break
    assert step > 8  # every step was visited: folder, files, syncs, link, switch, clean-up


@pytest.mark.parametrize(
    "owner", ["../../../../tmp/escaped", "/tmp/escaped", "..", ".", "a/b", "", "owner\x00", "x" * 200]
)
def test_an_owner_name_cannot_place_a_member_outside_the_run_folder(tmp_path, owner):
    folder = RunFolder(tmp_path / "run")
    with pytest.raises(PrivtuneError):
        folder.save_owner_adapter(owner, *owner_adapter())
    assert not (tmp_path / "escaped").exists()
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["run"]


def test_a_member_folder_that_links_elsewhere_is_refused(tmp_path):
    folder = RunFolder(tmp_path / "run")
    (tmp_path / "run" / "adapters").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "run" / "adapters" / "owner-0").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(PrivtuneError, match="would leave"):
        folder.save_owner_adapter("owner-0", *owner_adapter())
    assert list((tmp_path / "elsewhere").iterdir()) == []
    assert folder.save_owner_adapter("owner-1@node-7", *owner_adapter()).parent == tmp_path / "run" / "adapters"


def identity(**changes):
    return run_identity(FederationConfig.from_run_config(changes))


def test_a_run_folder_refuses_a_different_run_unless_overwritten(tmp_path):
    folder = RunFolder(tmp_path)
    folder.bind(identity())
    folder.save_checkpoint(Checkpoint(1, {"w": torch.ones(2)}))
    folder.save_owner_adapter("owner-0", *owner_adapter())
    (tmp_path / "notes.txt").write_text("the user's own file")
    folder.bind(identity(**{"num-server-rounds": 5, "round-timeout": 5.0}))  # a longer plan resumes
    folder.bind(identity(**{"gradient-checkpointing": True}))  # so does the same run on other hardware settings
    with pytest.raises(PrivtuneError, match=r"dp-epsilon.*--overwrite"):
        folder.bind(identity(**{"dp-epsilon": 1.0}))
    assert folder.load_checkpoint().round == 1
    folder.bind(identity(**{"dp-epsilon": 1.0}), overwrite=True)
    assert folder.load_checkpoint() is None and not (tmp_path / "adapters").exists()
    assert (tmp_path / "notes.txt").exists()  # only what a run writes is removed
    with pytest.raises(PrivtuneError, match="dp-epsilon"):
        folder.bind(identity())


def test_outputs_of_an_unrecorded_run_are_not_resumed_silently(tmp_path):
    RunFolder(tmp_path).save_checkpoint(Checkpoint(1, {"w": torch.ones(2)}))
    (tmp_path / "run.json").unlink(missing_ok=True)
    with pytest.raises(PrivtuneError, match="outputs of an earlier run"):
        RunFolder(tmp_path).bind(identity())
    RunFolder(tmp_path / "fresh").bind(identity())  # an empty folder is simply claimed
    assert json.loads((tmp_path / "fresh" / "run.json").read_text()) == identity()
