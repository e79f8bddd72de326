"""A real federation on loopback through the deploy/ scripts: Flower's Deployment Engine with TLS and
SuperNode authentication, three data owners as separate SuperNode processes, `flwr run` of two rounds;
and the SuperLink refusing a SuperNode with an unregistered key or without the federation's CA."""

from __future__ import annotations

import json
import math
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.deploy.conftest import DEPLOY, REPO, Processes, free_port, make_certs, tool_env, wait_for_text

pytestmark = pytest.mark.slow

OWNERS = 3
CONNECTION = "loopback"
REFUSAL_TIMEOUT = 60.0
RUN_TIMEOUT = 240.0
# Small enough for two cores: 2 rounds, few local steps; all owners must take part.
RUN_CONFIG = "num-server-rounds=2 local-steps=4 batch-size=4 block-size=64 min-train-nodes=3"


@dataclass
class Federation:
    root: Path
    certs: Path
    address: str
    cli_env: dict[str, str]
    superlink_log: Path


def write_owner_data(root: Path) -> list[Path]:
    """Three disjoint folders of text: every third Shakespeare work, cut short."""
    from privtune.common.corpus import shakespeare_works

    works = shakespeare_works()
    folders = []
    for owner in range(OWNERS):
        folder = root / f"data-{owner + 1}"
        folder.mkdir(parents=True)
        for doc in works[owner::OWNERS][:3]:
            (folder / f"{doc.name}.txt").write_text(doc.text[:20_000])
        folders.append(folder)
    return folders


def flwr(fed: Federation, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    return subprocess.run(["flwr", *args], capture_output=True, text=True, env=fed.cli_env, cwd=REPO, timeout=timeout)


def supernode_command(
    key: Path, data: Path, workspace: Path, port: int, address: str, ca: Path, *extra: str
) -> list[str]:
    return [
        "bash",
        str(DEPLOY / "supernode.sh"),
        "--key",
        str(key),
        "--data",
        str(data),
        "--workspace",
        str(workspace),
        "--port",
        str(port),
        "--superlink",
        address,
        "--ca",
        str(ca),
        *extra,
    ]


@pytest.fixture(scope="module")
def federation(tmp_path_factory, processes: Processes) -> Federation:
    root = tmp_path_factory.mktemp("loopback")
    certs = root / "certs"
    made = make_certs(certs, OWNERS + 1)  # node-4 is never registered
    assert made.returncode == 0, made.stderr
    port = free_port()
    address = f"127.0.0.1:{port}"
    cli_env = tool_env(root / "model-owner-flwr")
    log = root / "superlink.log"
    register = [arg for i in range(1, OWNERS + 1) for arg in ("--register", str(certs / "nodes" / f"node-{i}.pub"))]
    proc = processes.start(
        [
            "bash",
            str(DEPLOY / "superlink.sh"),
            "--certs",
            str(certs),
            "--port",
            str(port),
            "--connection",
            CONNECTION,
            *register,
        ],
        log,
        cli_env,
    )
    wait_for_text(log, "SuperLink ready", proc, timeout=90)
    return Federation(root, certs, address, cli_env, log)


def online_nodes(fed: Federation) -> int:
    listed = flwr(fed, "supernode", "ls", CONNECTION, "--format", "json")
    if listed.returncode != 0:
        return 0
    return sum(node["status"] == "online" for node in json.loads(listed.stdout)["nodes"])


def test_three_sites_train_two_rounds_over_tls(federation: Federation, processes: Processes):
    fed = federation
    data = write_owner_data(fed.root)
    for i, folder in enumerate(data, start=1):
        command = supernode_command(
            fed.certs / "nodes" / f"node-{i}",
            folder,
            fed.root / f"site-{i}",
            free_port(),
            fed.address,
            fed.certs / "ca.crt",
            "--owner",
            f"owner-{i}",
        )
        # supernode.sh gives each site its own Flower folder in its workspace; three on two cores get one thread each.
        processes.start(
            command, fed.root / f"supernode-{i}.log", tool_env(fed.root / f"site-{i}" / "flwr", OMP_NUM_THREADS="1")
        )
    deadline = time.monotonic() + 60
    while online_nodes(fed) < OWNERS:
        assert time.monotonic() < deadline, "the three SuperNodes did not come online:\n" + "\n".join(
            (fed.root / f"supernode-{i}.log").read_text()[-1500:] for i in range(1, OWNERS + 1)
        )
        time.sleep(1)

    run_dir = fed.root / "run"
    started = time.monotonic()
    run = flwr(
        fed,
        "run",
        str(REPO),
        CONNECTION,
        "--stream",
        "--run-config",
        f"{RUN_CONFIG} run-dir='{run_dir}'",
        timeout=RUN_TIMEOUT,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "[round 2/2]" in run.stdout, run.stdout[-3000:]
    print(f"flwr run took {time.monotonic() - started:.1f} s")

    runs = json.loads(flwr(fed, "ls", CONNECTION, "--format", "json").stdout)["runs"]
    assert len(runs) == 1 and runs[0]["status"] == "finished:completed", runs

    metrics = json.loads((run_dir / "metrics.json").read_text())
    rounds = metrics["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["accepted"] == OWNERS and not r["rejected"] for r in rounds), rounds
    assert rounds[0]["emulator_sent_to"] == OWNERS and rounds[1]["emulator_sent_to"] == 0
    assert all(math.isfinite(r["plugin_ppl"]) and r["plugin_ppl"] > 1 for r in rounds)
    assert math.isfinite(metrics["zero_shot_ppl"])
    # One adapter per site, under the owner name its node config gives (supernode.sh --owner), plus the aggregate.
    assert {p.name for p in (run_dir / "adapters").iterdir()} == {f"owner-{i}" for i in range(1, OWNERS + 1)} | {
        "aggregate"
    }
    # What each site keeps stays on the site: its emulator cache sits in its own workspace.
    for i in range(1, OWNERS + 1):
        assert any((fed.root / f"site-{i}" / "emulators").iterdir())


def refused(proc: subprocess.Popen, log: Path) -> str:
    try:
        proc.wait(timeout=REFUSAL_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"SuperNode was not refused within {REFUSAL_TIMEOUT:.0f} s:\n{log.read_text()[-2000:]}")
    assert proc.returncode != 0
    return log.read_text(errors="replace")


def test_supernode_with_unregistered_key_is_refused(federation: Federation, processes: Processes, tmp_path):
    fed = federation
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "text.txt").write_text("To be, or not to be, that is the question. " * 50)
    log = tmp_path / "supernode.log"
    proc = processes.start(
        supernode_command(
            fed.certs / "nodes" / "node-4",
            tmp_path / "data",
            tmp_path / "site",
            free_port(),
            fed.address,
            fed.certs / "ca.crt",
        ),
        log,
        tool_env(tmp_path / "flwr"),
    )
    output = refused(proc, log)
    assert "Failed to activate SuperNode" in output and "Exit Code: 305" in output, output[-2000:]
    assert "No SuperNode found with the given public key" in fed.superlink_log.read_text(errors="replace")


@pytest.mark.parametrize("trust", ["system CAs only", "another CA"])
def test_supernode_that_does_not_trust_the_federation_ca_is_refused(
    federation: Federation, processes: Processes, tmp_path, trust
):
    fed = federation
    key = fed.certs / "nodes" / "node-1"  # a registered key: only the TLS check can stop it
    log = tmp_path / "supernode.log"
    if trust == "another CA":
        assert make_certs(tmp_path / "other", 0).returncode == 0
        (tmp_path / "data").mkdir()
        command = supernode_command(
            key, tmp_path / "data", tmp_path / "site", free_port(), fed.address, tmp_path / "other" / "ca.crt"
        )
    else:  # flower-supernode itself: without --root-certificates it falls back to the system store
        command = [
            "flower-supernode",
            "--superlink",
            fed.address,
            "--auth-supernode-private-key",
            str(key),
            "--port",
            str(free_port()),
            "--max-retries",
            "1",
        ]
    proc = processes.start(command, log, tool_env(tmp_path / "flwr"))
    output = refused(proc, log)
    assert "CERTIFICATE_VERIFY_FAILED" in output, output[-2000:]
