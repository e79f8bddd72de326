"""``privtune simulate``: the same ServerApp and ClientApps, run by Flower's Simulation Engine on Ray.

Each virtual SuperNode is one data owner holding one partition of the embedded Shakespeare corpus
(or of ``--data``). In ULT mode this command also plays the data owners' out-of-band part: it makes
the federation key that they share (the model owner's ServerApp never reads it) and, as a key
holder, encodes the owners' held-out text for the model owner's evaluation (ids only).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from common.federation.config import FederationConfig


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--owners", type=int, default=4, help="number of simulated data owners (default 4)")
    parser.add_argument("--rounds", type=int, default=3, help="federated rounds (default 3)")
    parser.add_argument("--model", default="tiny-llama", help="tiny-gpt2|tiny-llama|tiny-opt|smollm2|PATH (default tiny-llama)")
    parser.add_argument("--encoding", choices=["ult", "raw"], default="raw", help="how owners encode text (default raw)")
    parser.add_argument("--ldp-epsilon", type=float, default=0.0, help="per-token LDP epsilon (0 = off)")
    parser.add_argument("--ldp-embedding", default="smollm2", help="embedding for the LDP mechanism (default smollm2)")
    parser.add_argument("--dp-epsilon", type=float, default=0.0, help="DP-SGD target epsilon per owner (0 = off)")
    parser.add_argument("--strategy", choices=["fedavg", "fedadam", "fedprox"], default="fedavg")
    parser.add_argument("--local-steps", type=int, default=FederationConfig.local_steps)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any other run-config key, e.g. --set block-size=128")
    parser.add_argument("--out", required=True, help="run folder (metrics.json, privacy.json, plots, model)")


def parse_sets(pairs: list[str]) -> dict[str, Any]:
    from common.errors import PrivtuneError

    values = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise PrivtuneError(f"--set expects KEY=VALUE, got {pair!r}")
        values[key.strip()] = value.strip()
    return values


def run(args: argparse.Namespace) -> int:
    overrides = {"num-server-rounds": args.rounds, "model": args.model, "encoding": args.encoding,
                 "ldp-epsilon": args.ldp_epsilon, "ldp-embedding": args.ldp_embedding, "dp-epsilon": args.dp_epsilon,
                 "strategy": args.strategy, "local-steps": args.local_steps, "run-dir": str(Path(args.out) / "server"),
                 "min-train-nodes": min(2, args.owners), **parse_sets(args.set)}
    metrics = simulate(FederationConfig.from_run_config(overrides), args.owners, Path(args.out))
    print(json.dumps({k: metrics[k] for k in ("zero_shot_ppl", "emulator_adapter_ppl", "plugin_ppl")}, indent=2))
    return 0


def simulate(cfg: FederationConfig, owners: int, out: Path, node_overrides: dict[int, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Run the federation in simulation; returns the metrics written to ``out/metrics.json``."""
    from flwr.simulation import run_simulation

    from client.app import build_app as build_client
    from server.app import build_app as build_server
    from server.simulation_report import write_simulation_outputs

    out.mkdir(parents=True, exist_ok=True)
    overrides = cfg.to_run_config()
    nodes = {i: {"workspace": str(out / "owners" / f"owner-{i}"), **(node_overrides or {}).get(i, {})} for i in range(owners)}
    run_simulation(server_app=build_server(overrides), client_app=build_client(overrides, nodes), num_supernodes=owners,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": 2, "include_dashboard": False}})
    return write_simulation_outputs(cfg, out, owners)
