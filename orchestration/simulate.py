"""``privtune simulate``: the same ServerApp and ClientApps, run by Flower's Simulation Engine on Ray.

Each virtual SuperNode is one data owner holding one partition of the embedded Shakespeare corpus,
or its own ``--data`` folder. In ULT mode this command also plays the data owners' out-of-band part: it makes
the federation key that they share (the model owner's ServerApp never reads it) and, as a key
holder, encodes the owners' held-out text for the model owner's evaluation (ids only).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from privtune.common.device import add_device_argument
from privtune.common.errors import PrivtuneError
from privtune.common.federation.config import FederationConfig

MAX_OWNERS = 64
"""Simulated owners all run on this machine, each a Ray virtual node that receives its own copy of
the emulator; beyond this, use a real deployment (deploy/)."""
DEFAULT_GPUS_PER_OWNER = 0.25
SIMULATION_ENTRIES = ("server", "owners", "federation", "metrics.json", "privacy.json")
"""What a simulation writes into ``--out`` (and ``--overwrite`` removes)."""


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--owners", type=int, default=4, help=f"number of simulated data owners, 1 to {MAX_OWNERS} (default 4)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="federated rounds (default 3)")
    parser.add_argument(
        "--model", default="tiny-llama", help="tiny-gpt2|tiny-llama|tiny-opt|smollm2|PATH (default tiny-llama)"
    )
    parser.add_argument(
        "--encoding", choices=["ult", "raw"], default="raw", help="how owners encode text (default raw)"
    )
    parser.add_argument("--ldp-epsilon", type=float, default=0.0, help="per-token LDP epsilon (0 = off)")
    parser.add_argument("--ldp-embedding", default="smollm2", help="embedding for the LDP mechanism (default smollm2)")
    parser.add_argument("--dp-epsilon", type=float, default=0.0, help="DP-SGD target epsilon per owner (0 = off)")
    parser.add_argument(
        "--dp-sample-rate",
        type=float,
        default=FederationConfig.dp_sample_rate,
        help="public DP-SGD Poisson rate q; each owner's expected batch is q x its records (default %(default)s)",
    )
    parser.add_argument("--strategy", choices=["fedavg", "fedadam", "fedprox"], default="fedavg")
    parser.add_argument("--local-steps", type=int, default=FederationConfig.local_steps)
    add_device_argument(parser)
    parser.add_argument(
        "--gpus-per-owner",
        type=float,
        default=DEFAULT_GPUS_PER_OWNER,
        help="share of a GPU, in (0, 1], each simulated owner reserves when the owners compute on CUDA "
        "(default 0.25: four owners share one GPU); unused on the CPU",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other run-config key, e.g. --set block-size=128",
    )
    parser.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="FOLDER",
        help="an owner's own folder of .txt/.jsonl files (instruction .jsonl included), once per owner in order "
        "(default: the owners' partitions of the embedded corpus)",
    )
    parser.add_argument("--out", required=True, help="run folder (metrics.json, privacy.json, plots, model)")
    audit = parser.add_argument_group("audit harness (then run 'privtune audit --run OUT')")
    audit.add_argument(
        "--canaries",
        type=int,
        default=0,
        metavar="K",
        help="plant K random secrets in owner-0's text and keep half of its records back as non-members",
    )
    audit.add_argument(
        "--canary-repeats", default="1,4,16", help="copies of each canary, cycled over the K canaries (default 1,4,16)"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a different run found in --out (the same run is resumed without this)",
    )


def parse_sets(pairs: list[str]) -> dict[str, Any]:
    values = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise PrivtuneError(f"--set expects KEY=VALUE, got {pair!r}")
        values[key.strip()] = value.strip()
    return values


def run(args: argparse.Namespace) -> int:
    overrides = {
        "num-server-rounds": args.rounds,
        "model": args.model,
        "encoding": args.encoding,
        "ldp-epsilon": args.ldp_epsilon,
        "ldp-embedding": args.ldp_embedding,
        "dp-epsilon": args.dp_epsilon,
        "dp-sample-rate": args.dp_sample_rate,
        "strategy": args.strategy,
        "local-steps": args.local_steps,
        "device": args.device,
        "run-dir": str(Path(args.out) / "server"),
        "min-train-nodes": min(2, args.owners),
        "overwrite": args.overwrite,
        **parse_sets(args.set),
    }
    cfg = FederationConfig.from_run_config(overrides)
    nodes = owner_folders(args.data, args.owners)
    if args.canaries and nodes:
        raise PrivtuneError("--canaries plants secrets in the embedded corpus; give it without --data")
    if args.canaries:
        from privtune.audit.harness import plant_secrets

        repeats = tuple(int(r) for r in args.canary_repeats.split(","))
        nodes = plant_secrets(cfg, args.owners, Path(args.out), args.canaries, repeats, overwrite=args.overwrite)
    with stop_on_signals():
        metrics = simulate(cfg, args.owners, Path(args.out), nodes, args.gpus_per_owner)
    from privtune.report import markdown_run_section, write_markdown_report

    out = Path(args.out)
    report = write_markdown_report(out, "privtune simulate", [markdown_run_section("Federated run", out, out)])
    print(f"report: {report}")
    print(json.dumps({k: metrics[k] for k in ("zero_shot_ppl", "emulator_adapter_ppl", "plugin_ppl")}, indent=2))
    return 0


def owner_folders(folders: list[str], owners: int) -> dict[int, dict[str, Any]] | None:
    """Each owner's ``data-path`` node config from ``--data``, one folder per owner."""
    if not folders:
        return None
    if len(folders) != owners:
        raise PrivtuneError(f"--data was given {len(folders)} time(s) for {owners} owners; give one folder per owner")
    return {i: {"data-path": str(Path(folder).expanduser().resolve())} for i, folder in enumerate(folders)}


def federation_key_path(out: Path) -> Path:
    """Where the simulated data owners keep the ULT key they share (the ServerApp never reads it)."""
    return out / "federation" / "federation.key"


def prepare_ult_federation(
    cfg: FederationConfig,
    owners: int,
    out: Path,
    nodes: dict[int, dict[str, Any]],
    shared_key: Path | None = None,
) -> FederationConfig:
    """The data owners' out-of-band part of a ULT federation, done once for all simulated owners.

    They agree on a federation key (the model owner never sees it) and use the public table that
    ships with the ULT-ready model. As key holders they also encode held-out text into ids for the
    model owner's per-round evaluation: ids only, which the model owner can score but not read. Each
    owner's held-out part comes from its own documents (its data folder, or its embedded partition).
    ``shared_key``: the key of another run of the same owners (the demo's non-private reference takes
    its private run's key, so both are scored on the same ids); a fresh key otherwise.
    """
    import dataclasses

    import torch

    from privtune.client.data import HELDOUT_FRACTION, MAX_EVAL_BLOCKS
    from privtune.client.site import SiteConfig, cap_characters, site_documents
    from privtune.common.models import ULT_TABLE_FILE
    from privtune.common.packing import holdout_split, pack
    from privtune.common.ult.keys import load_key_file, new_key_file
    from privtune.common.ult.tokenizer import UltTokenizer

    table = Path(cfg.model) / ULT_TABLE_FILE
    if not table.exists():
        raise PrivtuneError(
            f"encoding 'ult' needs a ULT-ready model folder with {ULT_TABLE_FILE}; {cfg.model} has none "
            "(make one with 'privtune demo' or common.ult.pretrain)"
        )
    key = federation_key_path(out)
    if not key.exists():
        key.parent.mkdir(parents=True, exist_ok=True)
        new_key_file(key, secret=None if shared_key is None else load_key_file(shared_key).secret)
    for node in nodes.values():
        node.setdefault("ult-table", str(table))
        node.setdefault("ult-key", str(key))
    tokenizer = UltTokenizer.from_files(table, key_file=key)
    per_owner = max(1, MAX_EVAL_BLOCKS // owners)
    heldout = [
        pack(
            cap_characters(holdout_split(part, HELDOUT_FRACTION).heldout, 2 * per_owner * cfg.block_size),
            tokenizer,
            cfg.block_size,
            per_owner,
        )
        for part in (
            site_documents(
                SiteConfig.from_node_config({**nodes[i], "partition-id": i, "num-partitions": owners}, cfg), cfg.seed
            )
            for i in range(owners)
        )
    ]
    eval_ids = out / "federation" / "eval_ids.pt"
    torch.save(torch.cat(heldout), eval_ids)
    return dataclasses.replace(cfg, eval_ids=str(eval_ids))


def backend_config(cfg: FederationConfig, gpus_per_owner: float = DEFAULT_GPUS_PER_OWNER) -> dict[str, Any]:
    """Ray resources of the virtual nodes: one CPU each, and ``gpus_per_owner`` of a GPU where the
    owners compute on CUDA (Ray then packs 1/gpus_per_owner owners onto each GPU and queues the rest)."""
    from privtune.common.device import resolve_device

    if not 0 < gpus_per_owner <= 1:
        raise PrivtuneError(
            f"--gpus-per-owner must be in (0, 1], a share of one GPU, got {gpus_per_owner}; Ray hides the GPUs from "
            "a virtual node that reserves none (to keep the owners off the GPU, give --device cpu)"
        )
    if cfg.device.strip().lower().startswith("cuda:"):
        raise PrivtuneError(
            f"--device {cfg.device}: Ray gives each simulated owner its GPU share and shows it as cuda; "
            "use --device cuda"
        )
    on_gpu = resolve_device(cfg.device).type == "cuda"
    return {
        "client_resources": {"num_cpus": 1, "num_gpus": gpus_per_owner if on_gpu else 0.0},
        "init_args": {"num_cpus": 2, "include_dashboard": False},
    }


def simulate(
    cfg: FederationConfig,
    owners: int,
    out: Path,
    node_overrides: dict[int, dict[str, Any]] | None = None,
    gpus_per_owner: float = DEFAULT_GPUS_PER_OWNER,
    shared_key: Path | None = None,
) -> dict[str, Any]:
    """Run the federation in simulation; returns the metrics written to ``out/metrics.json``.

    ``out`` holds one run: the same run resumes there, a different one is refused unless
    ``cfg.overwrite`` (see :func:`privtune.server.run_folder.bind_run`).
    """
    from flwr.simulation import run_simulation

    from privtune.client.app import build_app as build_client
    from privtune.report import write_simulation_outputs
    from privtune.server.app import build_app as build_server
    from privtune.server.run_folder import bind_run, run_identity

    if not 1 <= owners <= MAX_OWNERS:
        raise PrivtuneError(f"--owners must be between 1 and {MAX_OWNERS}, got {owners}")
    resources = backend_config(cfg, gpus_per_owner)
    claim_folder(out)
    nodes = {
        i: {"workspace": str(out / "owners" / f"owner-{i}"), **(node_overrides or {}).get(i, {})} for i in range(owners)
    }
    identity = {**run_identity(cfg), "owners": owners, "node-overrides": node_overrides or {}}
    bind_run(out, identity, SIMULATION_ENTRIES, overwrite=cfg.overwrite)
    if cfg.encoding == "ult":
        cfg = prepare_ult_federation(cfg, owners, out, nodes, shared_key)
    overrides = cfg.to_run_config()
    run_simulation(
        server_app=build_server(overrides),
        client_app=build_client(overrides, nodes),
        num_supernodes=owners,
        backend_config=resources,
    )
    metrics = write_simulation_outputs(cfg, out, owners)
    if cfg.encoding == "ult":
        metrics = key_holder_evaluation(cfg, out, nodes[0], metrics)
    return metrics


def claim_folder(out: Path) -> None:
    """Make ``out`` (a writable folder) before any work starts, or say why it cannot be one."""
    if out.exists() and not out.is_dir():
        raise PrivtuneError(f"--out {out} is a file; give a folder for the run's outputs")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PrivtuneError(f"cannot create --out {out}: {err.strerror}; choose a folder you can write to") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise PrivtuneError(f"--out {out} is not writable; choose a folder you can write to")


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGINT or SIGTERM end the simulation together with every process it started.

    Ray's processes ignore SIGINT, and those started by a driver interrupted mid-run outlive it (its
    agents kept running after a killed simulate); Flower's ServerApp thread would keep the
    interpreter waiting for replies no node will send. So on a signal the processes started here
    are stopped, and the command leaves without waiting for that thread. Ray's own crash handler
    would abort the process on SIGTERM before any of this runs, so it is turned off for the run.
    """
    os.environ["RAY_DISABLE_FAILURE_SIGNAL_HANDLER"] = "1"

    def interrupt(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    handled = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, interrupt) for sig in handled}
    try:
        yield
    except (KeyboardInterrupt, SystemExit) as stop:  # Ray's own SIGTERM handler exits with the signal number
        code = stop.code if isinstance(stop, SystemExit) and isinstance(stop.code, int) else 128 + signal.SIGINT
        stop_child_processes()
        print("privtune simulate: interrupted; the simulation's processes are stopped", file=sys.stderr, flush=True)
        os._exit(code if code > 128 else 128 + code)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def stop_child_processes(grace_s: float = 5.0) -> None:
    """Terminate every process this one started (Ray's head, workers and agents), then kill what is left."""
    import psutil

    children = psutil.Process().children(recursive=True)
    for child in children:
        with suppress(psutil.NoSuchProcess):
            child.terminate()
    _, alive = psutil.wait_procs(children, timeout=grace_s)
    for child in alive:
        with suppress(psutil.NoSuchProcess):
            child.kill()


def key_holder_evaluation(
    cfg: FederationConfig, out: Path, node: dict[str, Any], metrics: dict[str, Any]
) -> dict[str, Any]:
    """Fill in what the model owner could not measure without the key: the zero-shot and untrained
    emulator perplexities on the keyed held-out ids (see server.run_evaluation)."""
    import torch

    from privtune.common.models import load_model
    from privtune.common.ult.relabel import key_rows
    from privtune.server.run_evaluation import evaluate_run
    from privtune.server.run_folder import strict_json

    rows = key_rows(node["ult-table"], node["ult-key"])
    table = evaluate_run(
        Path(cfg.run_dir),
        load_model(cfg.model).model,
        torch.load(cfg.eval_ids, weights_only=True),
        cfg.seed,
        rows,
        title="key holder's evaluation on the owners' held-out text (ULT ids)",
    )
    metrics.update(
        {
            "zero_shot_ppl": table["zero_shot"],
            "emulator_ppl": table["emulator"],
            "emulator_adapter_ppl": table["emulator_adapter"],
            "plugin_ppl": table["plugin"],
            "evaluated_by": "key holder (simulation harness)",
        }
    )
    (out / "metrics.json").write_text(json.dumps(strict_json(metrics), indent=2, sort_keys=True) + "\n")
    return metrics
