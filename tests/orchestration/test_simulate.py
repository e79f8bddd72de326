"""``privtune simulate`` facing absurd arguments, a reused or unusable --out, runs in which no update
is accepted, a DP-SGD run killed mid-round, and signals. Real Flower simulations on tiny models."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from privtune.cli import main
from privtune.client.app import PUBLIC_REASONS
from privtune.common.errors import PrivtuneError
from privtune.common.federation.config import FederationConfig
from privtune.common.ledger import Ledger
from privtune.server.run_folder import Checkpoint, RunFolder
from privtune.simulate import MAX_OWNERS, simulate

TINY = ["--rounds", "1", "--local-steps", "2", "--set", "block-size=32", "--set", "max-train-blocks=16"]
RUN = {"model": "tiny-llama", "local-steps": 2, "batch-size": 4, "block-size": 32, "max-train-blocks": 16}


def refused(capsys, *argv: str) -> str:
    assert main(["simulate", *argv]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err
    return err


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--owners", "0"], f"between 1 and {MAX_OWNERS}"),
        (["--owners", "-1"], f"between 1 and {MAX_OWNERS}"),
        (["--owners", "500"], f"between 1 and {MAX_OWNERS}"),
        (["--ldp-epsilon", "inf"], "finite"),
        (["--ldp-epsilon", "nan"], "finite"),
        (["--dp-epsilon", "inf"], "finite"),
        (["--dp-epsilon", "-1"], ">= 0"),
        (["--rounds", "0"], "at least 1"),
        (["--local-steps", "0"], "positive"),
        (["--set", "max-examples-per-owner=-5"], "max-examples-per-owner"),
        (["--set", "overwrite=maybe"], "must be bool"),
    ],
)
def test_absurd_arguments_are_refused_before_anything_runs(capsys, tmp_path, argv, message):
    assert message in refused(capsys, *argv, "--out", str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_an_out_that_cannot_be_a_folder_is_named(capsys, tmp_path):
    file = tmp_path / "results.txt"
    file.write_text("not a folder")
    assert "is a file" in refused(capsys, *TINY, "--out", str(file))
    assert "cannot create" in refused(capsys, *TINY, "--out", str(file / "run"))
    assert file.read_text() == "not a folder"


def config(out: Path, **extra) -> FederationConfig:
    return FederationConfig.from_run_config({**RUN, "run-dir": str(out / "server"), **extra})


def assert_finished(out: Path, rounds: int) -> dict:
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == list(range(1, rounds + 1))
    assert (out / "server" / "model" / "config.json").exists()
    assert (out / "server" / "adapters" / "aggregate" / "adapter_model.safetensors").exists()
    return metrics


@pytest.mark.slow
def test_a_run_in_which_no_update_is_accepted_ends_with_its_outputs(tmp_path):
    empty = tmp_path / "empty-data"
    empty.mkdir()
    nodes = {i: {"data-path": str(empty)} for i in range(2)}
    simulate(config(tmp_path / "run", **{"num-server-rounds": 1}), owners=2, out=tmp_path / "run", node_overrides=nodes)
    (row,) = assert_finished(tmp_path / "run", 1)["rounds"]
    assert row["accepted"] == 0 and len(row["rejected"]) == 2
    # The reason names a step, never the site's layout (its paths).
    assert {r["reason"] for r in row["rejected"]} <= {f"declined: {reason}" for reason in PUBLIC_REASONS.values()}


def dpsgd_rounds(out: Path, owners: int) -> list[int]:
    return [len(Ledger(out / "owners" / f"owner-{i}" / "ledger.sqlite").records("dpsgd")) for i in range(owners)]


@pytest.mark.slow
def test_a_dpsgd_run_killed_mid_round_still_finishes_and_the_round_stays_spent(tmp_path, capsys):
    out = tmp_path / "run"
    dp = config(out, **{"num-server-rounds": 2, "dp-epsilon": 2.0, "member-shards": 0})  # the federated track only
    simulate(dp, owners=2, out=out)
    assert dpsgd_rounds(out, 2) == [2, 2]
    # The state a kill leaves after the owners trained round 2 (recorded in their ledgers) and before
    # the server checkpointed it: the server's checkpoint is round 1's.
    folder = RunFolder(out / "server")
    last = folder.load_checkpoint()
    folder.save_checkpoint(Checkpoint(1, last.adapter, last.history[:1], last.extra, last.optimizer))
    rerun = simulate(dp, owners=2, out=out)
    assert dpsgd_rounds(out, 2) == [2, 2]  # the spent round stays spent, nothing more is spent
    assert_finished(out, 2)
    assert rerun["rounds"][1]["accepted"] == 0
    assert [r["reason"] for r in rerun["rounds"][1]["rejected"]] == ["declined: privacy budget exhausted"] * 2
    assert rerun["rounds"][0]["accepted"] == 2  # round 1 as the checkpoint recorded it
    # The same folder for a different run (here without DP-SGD) is refused, not mixed in.
    capsys.readouterr()
    assert "dp-epsilon" in refused(capsys, *TINY, "--owners", "2", "--out", str(out))


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signalled_simulate_leaves_no_ray_process_behind(tmp_path, signum):
    command = [sys.executable, "-m", "privtune.cli", "simulate", "--owners", "2", "--rounds", "3"]
    command += ["--local-steps", "200", "--out", str(tmp_path / "run")]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    seen: dict[int, psutil.Process] = {}
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            seen.update({p.pid: p for p in descendants(proc.pid)})
            names = " ".join(p.name() for p in seen.values() if p.is_running())
            if "raylet" in names and ("DashboardAgent" in names or "RuntimeEnvAgent" in names):
                break
            time.sleep(1)
        assert proc.poll() is None and seen, "the simulation never brought Ray up"
        time.sleep(2)
        seen.update({p.pid: p for p in descendants(proc.pid)})
        proc.send_signal(signum)
        assert proc.wait(timeout=60) == 128 + signum
        assert "interrupted" in proc.stderr.read().decode()
        _, alive = psutil.wait_procs(list(seen.values()), timeout=10)
        assert not [(p.pid, p.name()) for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    finally:
        if proc.poll() is None:
            proc.kill()
        for leftover in seen.values():
            if leftover.is_running():
                os.kill(leftover.pid, signal.SIGKILL)


def test_virtual_nodes_ask_for_a_gpu_share_only_where_cuda_is(monkeypatch):
    """Config only: nothing runs on a GPU here."""
    import torch

    from privtune.simulate import backend_config

    cfg = FederationConfig.from_run_config(RUN)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert backend_config(cfg, 0.5)["client_resources"] == {"num_cpus": 1, "num_gpus": 0.0}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert backend_config(cfg, 0.5)["client_resources"] == {"num_cpus": 1, "num_gpus": 0.5}
    cpu = FederationConfig.from_run_config({**RUN, "device": "cpu"})
    assert backend_config(cpu, 0.5)["client_resources"]["num_gpus"] == 0.0
    with pytest.raises(PrivtuneError, match="use --device cuda"):
        backend_config(FederationConfig.from_run_config({**RUN, "device": "cuda:1"}), 0.5)
    for share in (0.0, 2.0):
        with pytest.raises(PrivtuneError, match="gpus-per-owner must be in"):
            backend_config(cfg, share)


def test_a_bad_device_is_refused_before_anything_runs(capsys, tmp_path):
    assert "is not one of" in refused(capsys, "--out", str(tmp_path / "run"), "--device", "gpu")
    assert not (tmp_path / "run").exists()


def test_ult_held_out_ids_come_from_each_owners_own_documents(tmp_path):
    """An owner with a data folder is evaluated on its own held-out text, not on the embedded corpus."""
    import torch

    from privtune.common.models import ULT_TABLE_FILE, LoadedModel, save_model, tiny_model
    from privtune.common.ult import UltConfig, build_table
    from privtune.common.ult.tokenizer import UltTokenizer
    from privtune.simulate import federation_key_path, prepare_ult_federation

    marker = "zqxv owner zero alone writes zqxv. "
    model = tmp_path / "ult-model"
    table = build_table([marker * 400, "To be, or not to be, that is the question. " * 400], UltConfig(vocab_size=300))
    save_model(LoadedModel(tiny_model("llama", vocab_size=300), UltTokenizer(table), "tiny-ult"), model)
    data = tmp_path / "owner-0-data"
    data.mkdir()
    (data / "letters.txt").write_text(marker * 200)
    out = tmp_path / "sim"
    nodes = {i: {"workspace": str(out / "owners" / f"owner-{i}")} for i in range(2)}
    nodes[0]["data-path"] = str(data)
    cfg = FederationConfig.from_run_config({**RUN, "model": str(model), "encoding": "ult", "run-dir": str(out)})
    cfg = prepare_ult_federation(cfg, 2, out, nodes)
    ids = torch.load(cfg.eval_ids, weights_only=True)
    tokenizer = UltTokenizer.from_files(model / ULT_TABLE_FILE, key_file=federation_key_path(out))
    decoded = [tokenizer.decode(row.tolist()) for row in ids]
    half = len(decoded) // 2
    assert "".join(decoded[:half]).count("zqxv owner zero") >= 3
    assert "owner zero" not in "".join(decoded[half:])
