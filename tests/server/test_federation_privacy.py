"""What crosses the wire in a ULT + LDP federation: adapters and numbers, never text or tables."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from privtune.client.app import build_app as build_client
from privtune.common.corpus import private_partitions
from privtune.common.errors import PrivtuneError
from privtune.common.federation.config import FederationConfig
from privtune.common.ledger import Ledger
from privtune.common.models import LoadedModel, save_model, tiny_model
from privtune.common.ult.config import UltConfig
from privtune.common.ult.fingerprints import table_fingerprints
from privtune.common.ult.keys import load_key_file
from privtune.common.ult.table import build_table, load_table
from privtune.common.ult.tokenizer import UltTokenizer
from privtune.server.federation import run_federation
from privtune.simulate import prepare_ult_federation

pytestmark = pytest.mark.slow


class RecordingGrid:
    """The real grid, with every message content that goes out or comes back kept for inspection."""

    def __init__(self, grid: Grid, sink: list[bytes]) -> None:
        self._grid, self._sink = grid, sink

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        for message in messages + [r for r in replies if not r.has_error()]:
            self._sink.append(serialise(message.content))
        return replies

    def __getattr__(self, name):
        return getattr(self._grid, name)


def serialise(content) -> bytes:
    parts = []
    for record in content.array_records.values():
        parts += [array.data for array in record.values()]
    for record in list(content.config_records.values()) + list(content.metric_records.values()):
        parts.append(repr(dict(record)).encode())
    return b"\n".join(parts)


@pytest.fixture(scope="module")
def ult_model(tmp_path_factory):
    from privtune.common.corpus import public_corpus

    folder = tmp_path_factory.mktemp("ult-model")
    table = build_table(
        [d.text[:100_000] for d in public_corpus()], UltConfig(vocab_size=768, patch_size=8, band_width=16)
    )
    save_model(LoadedModel(tiny_model("llama", vocab_size=768), UltTokenizer(table), "tiny-ult"), folder)
    return folder


@dataclass
class UltRun:
    root: Path
    cfg: FederationConfig
    nodes: dict
    wire: list[bytes]
    owners: int


@pytest.fixture(scope="module")
def ult_run(tmp_path_factory, ult_model) -> UltRun:
    """A 3-owner ULT + LDP federation with every message recorded."""
    tmp_path = tmp_path_factory.mktemp("ult-run")
    owners = 3
    cfg = FederationConfig.from_run_config(
        {
            "model": str(ult_model),
            "encoding": "ult",
            "num-server-rounds": 2,
            "local-steps": 5,
            "max-train-blocks": 16,
            "block-size": 64,
            "k-bottom": 1,
            "k-top": 1,
            "n-emulator": 2,
            "ldp-epsilon": 20.0,
            "ldp-embedding": "tiny",
            "run-dir": str(tmp_path / "server"),
        }
    )
    nodes = {i: {"workspace": str(tmp_path / "owners" / f"owner-{i}")} for i in range(owners)}
    cfg = prepare_ult_federation(cfg, owners, tmp_path, nodes)
    wire: list[bytes] = []
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        run_federation(RecordingGrid(grid, wire), cfg)

    run_simulation(
        server_app=server,
        client_app=build_client(cfg.to_run_config(), nodes),
        num_supernodes=owners,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": 2, "include_dashboard": False},
        },
    )
    return UltRun(tmp_path, cfg, nodes, wire, owners)


def test_ult_ldp_run_sends_no_text_and_no_table(ult_run):
    tmp_path, cfg, nodes, wire, owners = ult_run.root, ult_run.cfg, ult_run.nodes, ult_run.wire, ult_run.owners
    metrics = json.loads((tmp_path / "server" / "metrics.json").read_text())
    assert all(r["accepted"] == owners for r in metrics["rounds"])
    assert wire, "nothing was recorded"
    blob = b"\n".join(wire)
    table = load_table(nodes[0]["ult-table"])
    for secret in table_fingerprints(table, load_key_file(nodes[0]["ult-key"])):
        assert secret not in blob
    for part in private_partitions(owners, cfg.seed):
        for doc in part:
            for start in range(0, min(len(doc.text), 20_000), 2_000):
                snippet = doc.text[start : start + 32].encode()
                if len(snippet.strip()) >= 24:
                    assert snippet not in blob
    for i in range(owners):
        report = Ledger(tmp_path / "owners" / f"owner-{i}" / "ledger.sqlite", create=False).report()
        ldp = [g for g in report["guarantees"] if g["kind"] == "ldp"]
        assert ldp and ldp[0]["releases"] > 0 and ldp[0]["max_token_epsilon"] > 0
    privacy = metrics["privacy_reported"]
    assert sorted(privacy) == [f"owner-{i}" for i in range(owners)]
    assert all(v["ldp-epsilon-token"] > 0 for v in privacy.values())


def test_key_holders_serve_the_keyed_members_with_a_keyed_p0(ult_run, capsys):
    """The run's keyed adapters behind the PMixED service: refused with the public p0, served with a
    key holder's relabelled p0, and a key holder's query decodes the ids locally."""
    from privtune.cli import main as privtune
    from privtune.server.inference import cli

    node, root = ult_run.nodes[0], ult_run.root
    parser = argparse.ArgumentParser()
    cli.configure(parser)
    serve = [
        "--run",
        str(root / "server"),
        "--queries",
        "8",
        "--q",
        "0.5",
        "--num-cpus",
        "2",
        "--port",
        "0",
        "--ledger",
        str(root / "pmixed.sqlite"),
        "--ledger-registry",
        str(root / "ledger-registry.json"),
    ]
    with pytest.raises(PrivtuneError, match="members are ULT-keyed"):
        cli.start(cli.ServeConfig.from_args(parser.parse_args(serve)))
    p0 = root / "keyed-p0.safetensors"
    assert (
        privtune(
            [
                "ult",
                "keyed-public",
                "--model",
                ult_run.cfg.model,
                "--table",
                node["ult-table"],
                "--key-file",
                node["ult-key"],
                "-o",
                str(p0),
            ]
        )
        == 0
    )
    started = cli.start(cli.ServeConfig.from_args(parser.parse_args([*serve, "--public-embeddings", str(p0)])))
    try:
        assert started.service.n_members == ult_run.owners
        capsys.readouterr()
        assert (
            privtune(
                [
                    "query",
                    "--address",
                    f"127.0.0.1:{started.port}",
                    "--prompt",
                    "To be, or not",
                    "--max-new-tokens",
                    "6",
                    "--table",
                    node["ult-table"],
                    "--key-file",
                    node["ult-key"],
                ]
            )
            == 0
        )
        captured = capsys.readouterr()
        assert captured.out.startswith("To be, or not") and len(captured.out.strip()) > len("To be, or not")
        assert "6 token(s) privately sampled; 2 queries left" in captured.err
    finally:
        started.stop()


def test_the_demo_serves_continuations_until_its_budget_cannot_pay(ult_run, capsys):
    from privtune.common.models import ULT_TABLE_FILE
    from privtune.demo_serving import PROMPTS, DemoServing, KeyHolder, serve_and_sample

    node, run = ult_run.nodes[0], ult_run.root / "server"
    settings = DemoServing(tokens=3, queries=8)
    holder = KeyHolder(Path(ult_run.cfg.model), Path(ult_run.cfg.model) / ULT_TABLE_FILE, Path(node["ult-key"]))
    serve_and_sample(run, settings, holder)
    first = capsys.readouterr().out
    assert [line.split(" -> ")[0].strip() for line in first.splitlines() if " -> " in line] == [
        repr(p) for p in PROMPTS[:2]
    ]
    assert "budget: 6 of 8 queries spent" in first and (run / "keyed-p0.safetensors").is_file()
    serve_and_sample(run, settings, holder)
    second = capsys.readouterr().out
    assert " -> " not in second and "cannot pay for another 3-token continuation" in second
    assert "budget: 6 of 8 queries spent" in second
