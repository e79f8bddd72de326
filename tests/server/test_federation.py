"""The federated pipeline end to end on Flower's Simulation Engine (Ray), with tiny real models."""

from __future__ import annotations

import json

import pytest
import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from privtune.client.app import handle_train
from privtune.common.federation.config import FederationConfig
from privtune.common.federation.records import ARRAYS, from_arrays, to_arrays
from privtune.common.offsite import load_adapter
from privtune.server.federation import format_round
from privtune.server.inference.members import from_run_folder
from privtune.simulate import simulate

pytestmark = pytest.mark.slow

BASE = {
    "model": "tiny-llama",
    "num-server-rounds": 2,
    "local-steps": 15,
    "batch-size": 8,
    "block-size": 64,
    "max-train-blocks": 96,
    "learning-rate": 0.003,
    "k-bottom": 1,
    "k-top": 1,
    "n-emulator": 2,
}


def config(tmp_path, **extra) -> FederationConfig:
    return FederationConfig.from_run_config({**BASE, "run-dir": str(tmp_path / "server"), **extra})


@pytest.mark.parametrize("strategy,shards", [("fedavg", 1), ("fedprox", 2)])
def test_three_owners_improve_the_plugged_in_model(tmp_path, strategy, shards):
    cfg = config(tmp_path, strategy=strategy, **{"proximal-mu": 0.01, "member-shards": shards})
    metrics = simulate(cfg, owners=3, out=tmp_path)
    rounds = metrics["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["accepted"] == 3 and not r["rejected"] for r in rounds)
    assert metrics["plugin_ppl"] < metrics["zero_shot_ppl"]
    assert rounds[1]["plugin_ppl"] < rounds[0]["plugin_ppl"]
    # The emulator travels once; round 2 carries the adapter only, and is much smaller.
    assert rounds[0]["emulator_sent_to"] == 3 and rounds[1]["emulator_sent_to"] == 0
    assert rounds[1]["records_down"] == [ARRAYS]
    assert rounds[1]["bytes_down"] * 3 < rounds[0]["bytes_down"]
    for name in ("metrics.json", "metrics.csv", "plots/training.png", "model/config.json", "checkpoint/state.json"):
        assert (tmp_path / "server" / name).exists(), name
    # Each member depends on one shard of one owner's data, so the service accepts the run's ensemble.
    split = metrics["members"]["owner-0" if shards == 1 else "owner-0.shard-1-of-2"]["split"]
    expected = {
        (f"owner-{i}" if shards == 1 else f"owner-{i}.shard-{k + 1}-of-{shards}"): {
            "owners": [f"owner-{i}"],
            "shard": k,
            "shards": shards,
            "split": split,
        }
        for i in range(3)
        for k in range(shards)
    }
    assert metrics["members"] == expected
    assert sorted(p.name for p in (tmp_path / "server" / "adapters").iterdir()) == sorted([*expected, "aggregate"])
    assert from_run_folder(tmp_path / "server").n_members == 3 * shards
    aggregate = json.loads((tmp_path / "server" / "adapters" / "aggregate" / "manifest.json").read_text())
    assert aggregate["depends_on"]["owners"] == ["owner-0", "owner-1", "owner-2"]


def faulty_client(cfg: FederationConfig, workspaces: dict[int, str]) -> ClientApp:
    """Owner 0 crashes, owner 1 sends NaNs (update and member), the others are honest (owner 2 has no
    budget via node config)."""
    overrides = cfg.to_run_config()
    nodes = {i: {"workspace": w} for i, w in workspaces.items()}
    nodes[2]["dp-budget"] = 0.01
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        owner = int(context.node_config["partition-id"])
        if owner == 0:
            raise RuntimeError("owner 0's machine fell over")
        reply = handle_train(msg, context, overrides, nodes)
        if owner == 1:  # its federated update and its member alike
            for key in list(reply.content.array_records):
                state = from_arrays(reply.content.array_records[key])
                first = next(iter(state))
                state[first] = torch.full_like(state[first], float("nan"))
                reply.content[key] = to_arrays(state)
        return reply

    return app


def test_faults_are_reported_and_the_run_completes(tmp_path):
    from flwr.serverapp import ServerApp  # noqa: F401  (the real server app is used below)
    from flwr.simulation import run_simulation

    from privtune.server.app import build_app

    cfg = config(tmp_path, **{"dp-epsilon": 1.0, "min-train-nodes": 4})
    workspaces = {i: str(tmp_path / "owners" / f"owner-{i}") for i in range(4)}
    run_simulation(
        server_app=build_app(cfg.to_run_config()),
        client_app=faulty_client(cfg, workspaces),
        num_supernodes=4,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": 2, "include_dashboard": False},
        },
    )
    metrics = json.loads((tmp_path / "server" / "metrics.json").read_text())
    for entry in metrics["rounds"]:
        reasons = " | ".join(r["reason"] for r in entry["rejected"])
        assert entry["accepted"] == 1, reasons
        assert "fell over" in reasons
        assert "NaN" in reasons
        assert "budget" in reasons
    assert metrics["plugin_ppl"] < metrics["zero_shot_ppl"]
    # The member track is private training too: owner 2 cannot pay for it, owner 0 crashes, owner 1's
    # member is refused for its NaNs; only the honest owner 3 has a member.
    assert sorted(metrics["members"]) == ["owner-3"]
    refusals = " | ".join(r["reason"] for r in metrics["members_refused"])
    assert len(metrics["members_refused"]) == 3 and "member-0" in refusals and "NaN" in refusals
    assert "budget" in refusals and "fell over" in refusals


def test_a_restarted_server_resumes_from_its_last_checkpoint(tmp_path, capsys):
    """FedAdam: a run stopped after round 1 and resumed ends where an uninterrupted run ends (the
    optimiser's moments, its round count and the clients' per-round seeds all carry over)."""
    fedadam = {"strategy": "fedadam", "server-learning-rate": 0.01}
    first = simulate(
        config(tmp_path / "resumed", **fedadam, **{"num-server-rounds": 1}), owners=2, out=tmp_path / "resumed"
    )
    assert [r["round"] for r in first["rounds"]] == [1]
    # The same run folder with a longer plan: the server finds round 1's checkpoint and runs round 2 only.
    second = simulate(config(tmp_path / "resumed", **fedadam), owners=2, out=tmp_path / "resumed")
    assert "resuming from round 1" in capsys.readouterr().out
    assert [r["round"] for r in second["rounds"]] == [1, 2]
    assert second["rounds"][0] == first["rounds"][0]
    assert second["rounds"][1]["emulator_sent_to"] == 2  # a restarted server does not know who has the emulator
    straight = simulate(config(tmp_path / "straight", **fedadam), owners=2, out=tmp_path / "straight")
    assert second["rounds"][1]["loss"] == pytest.approx(straight["rounds"][1]["loss"], rel=1e-6)
    resumed, uninterrupted = (
        load_adapter(tmp_path / run / "server" / "adapters" / "aggregate")[0] for run in ("resumed", "straight")
    )
    assert resumed.keys() == uninterrupted.keys()
    for name in resumed:
        torch.testing.assert_close(resumed[name], uninterrupted[name], rtol=1e-5, atol=1e-6)


def test_a_run_in_which_every_owner_declines_ends_with_its_outputs(tmp_path):
    """No update is accepted in any round (every owner's DP budget is below one round's cost): the run
    still writes its metrics and the model with the starting adapter, and no owner has a member."""
    cfg = config(tmp_path, **{"dp-epsilon": 1.0, "num-server-rounds": 1, "local-steps": 3})
    metrics = simulate(cfg, owners=2, out=tmp_path, node_overrides={i: {"dp-budget": 0.01} for i in range(2)})
    assert [(r["accepted"], len(r["rejected"])) for r in metrics["rounds"]] == [(0, 2)]
    assert all(r["reason"] == "declined: privacy budget exhausted" for r in metrics["rounds"][0]["rejected"])
    assert metrics["members"] == {} and len(metrics["members_refused"]) == 2
    assert (tmp_path / "server" / "model" / "config.json").exists()
    aggregate, _ = load_adapter(tmp_path / "server" / "adapters" / "aggregate")
    lora_b = [t for name, t in aggregate.items() if name.endswith("lora_B")]
    assert lora_b and all(not t.any() for t in lora_b), "the aggregate must be the untrained start (LoRA B = 0)"


def test_the_round_line_says_when_no_owner_released_a_loss():
    row = {
        "round": 1,
        "loss": float("nan"),
        "plugin_ppl": 117.0,
        "examples": 2,
        "bytes_down": 4e8,
        "bytes_up": 2.6e6,
        "accepted": 2,
        "rejected": [],
        "privacy": {},
    }
    assert "loss not released" in format_round(row, 2)
    assert "loss 3.2000" in format_round({**row, "loss": 3.2}, 2)
