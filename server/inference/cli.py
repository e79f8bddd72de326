"""``privtune serve``: start Ray (or join a cluster), the PMixED replicas and the gRPC API."""

from __future__ import annotations

import argparse
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from privtune.common.errors import PrivtuneError
from privtune.common.paths import cache_dir
from privtune.common.pmixed.accountant import PMixedBudget
from privtune.server.inference.members import from_arguments

if TYPE_CHECKING:
    from privtune.server.inference.service import PMixedService

DEFAULT_LEDGER_NAME = "pmixed-ledger.sqlite"


def configure(parser: argparse.ArgumentParser) -> None:
    what = parser.add_argument_group("what to serve")
    what.add_argument("--run", help="a federated run folder (base model from its metrics.json, members from adapters/)")
    what.add_argument(
        "--model",
        help="base model (public p0): tiny-gpt2 | tiny-llama | tiny-opt | smollm2 | HF folder; "
        "with --run it overrides the run's model",
    )
    what.add_argument(
        "--adapters", nargs="+", metavar="DIR", help="member adapter folders (adapter.safetensors + manifest)"
    )
    what.add_argument(
        "--public-embeddings",
        metavar="FILE",
        help="ULT-keyed members only: p0's embedding rows in the federation key's order, from a key "
        "holder's 'privtune ult keyed-public'",
    )
    budget = parser.add_argument_group("privacy budget (PMixED, DESIGN.md section 5)")
    budget.add_argument("--epsilon", type=float, default=8.0, help="total epsilon over all queries (default 8)")
    budget.add_argument("--delta", type=float, default=1e-5, help="delta (default 1e-5)")
    budget.add_argument("--alpha", type=int, default=3, help="Renyi order of the accounting (default 3)")
    budget.add_argument(
        "--queries",
        "-T",
        dest="queries",
        type=int,
        default=1024,
        help="queries (= released tokens) the budget is split over (default 1024)",
    )
    budget.add_argument("--q", type=float, default=0.03, help="Poisson subsampling rate of members (default 0.03)")
    budget.add_argument(
        "--ledger",
        help=f"ledger file shared by all replicas (default RUN/{DEFAULT_LEDGER_NAME}, or one in the privtune cache)",
    )
    ray_group = parser.add_argument_group("Ray and network")
    ray_group.add_argument(
        "--address", help="existing Ray cluster (e.g. ray://host:10001 or 'auto'); default: start one"
    )
    ray_group.add_argument("--num-cpus", type=int, help="CPUs of the local Ray instance (default: all)")
    ray_group.add_argument("--num-replicas", type=int, default=1, help="ensemble replicas (default 1)")
    ray_group.add_argument("--cpus-per-replica", type=float, default=1.0, help="CPUs (torch threads) per replica")
    ray_group.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    ray_group.add_argument("--port", type=int, default=50051, help="gRPC port (default 50051; 0 = any free port)")
    tls = parser.add_argument_group("TLS (required off loopback; deploy/certs.sh makes the files)")
    tls.add_argument("--tls-cert", metavar="PEM", help="server certificate chain, e.g. deploy/certs/server.pem")
    tls.add_argument("--tls-key", metavar="KEY", help="its private key, e.g. deploy/certs/server.key")
    tls.add_argument(
        "--insecure",
        action="store_true",
        help="serve plaintext on a non-loopback --host (prompts and tokens cross the network readable)",
    )


def ledger_path(args: argparse.Namespace) -> Path:
    if args.ledger:
        return Path(args.ledger).expanduser()
    if args.run:
        return Path(args.run) / DEFAULT_LEDGER_NAME
    return cache_dir("ledgers") / DEFAULT_LEDGER_NAME


def service_config(args: argparse.Namespace):
    from privtune.server.inference.service import ServiceConfig

    served = from_arguments(args.run, args.model, args.adapters, args.public_embeddings)
    budget = PMixedBudget(
        epsilon=args.epsilon, delta=args.delta, alpha=args.alpha, T=args.queries, q=args.q, n_members=served.n_members
    )
    return ServiceConfig(served, budget, str(ledger_path(args)), args.num_replicas, args.cpus_per_replica)


LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}


def server_credentials(args: argparse.Namespace) -> grpc.ServerCredentials | None:
    """TLS credentials from --tls-cert/--tls-key; None (plaintext) only on loopback or with --insecure."""
    if bool(args.tls_cert) != bool(args.tls_key):
        raise PrivtuneError("give both --tls-cert and --tls-key (deploy/certs.sh writes server.pem and server.key)")
    if not args.tls_cert:
        if args.host not in LOOPBACK and not args.insecure:
            raise PrivtuneError(
                f"--host {args.host} is reachable from the network and no TLS was given: prompts and released tokens "
                "would travel in plaintext. Give --tls-cert/--tls-key (deploy/certs.sh --host NAME makes them), "
                "or --insecure to accept that"
            )
        return None
    try:
        chain, key = Path(args.tls_cert).read_bytes(), Path(args.tls_key).read_bytes()
    except OSError as err:
        raise PrivtuneError(f"cannot read the TLS files: {err}") from None
    return grpc.ssl_server_credentials([(key, chain)])


@dataclass
class Running:
    """A started service; ``stop`` shuts down gRPC, the actors and (if it started it) Ray."""

    server: grpc.Server
    port: int
    service: PMixedService
    owns_ray: bool

    def stop(self) -> None:
        import ray

        self.server.stop(grace=2).wait()
        self.service.shutdown()
        if self.owns_ray:
            ray.shutdown()


def start(args: argparse.Namespace) -> Running:
    import ray

    from privtune.common.models import load_tokenizer
    from privtune.server.inference.grpc_api import start_server
    from privtune.server.inference.service import PMixedService

    config = service_config(args)
    credentials = server_credentials(args)
    owns_ray = not ray.is_initialized()
    if owns_ray:
        ray.init(
            address=args.address,
            num_cpus=None if args.address else args.num_cpus,
            include_dashboard=False,
            namespace="privtune",
            log_to_driver=False,
        )
    try:
        service = PMixedService(config)
        server, port = start_server(service, load_tokenizer(config.served.model), args.host, args.port, credentials)
    except BaseException:
        if owns_ray:
            ray.shutdown()
        raise
    return Running(server, port, service, owns_ray)


def run(args: argparse.Namespace) -> int:
    running = start(args)
    budget = running.service.budget_status()
    print(
        f"privtune serve: {running.service.n_members} members of {running.service.config.served.model} on "
        f"{args.num_replicas} replica(s), gRPC{' (TLS)' if args.tls_cert else ''} on "
        f"{args.host}:{running.port}; budget {budget['queries_left']} of "
        f"{budget['queries_total']} queries left (({budget['epsilon']:g}, {budget['delta']:g})-DP, ledger "
        f"{budget['ledger']}); Ctrl-C stops",
        flush=True,
    )
    stopped = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # SIGINT too: a shell's background job ignores it otherwise
        signal.signal(sig, lambda *_: stopped.set())
    while not stopped.wait(1.0):
        pass
    running.stop()
    print("privtune serve: stopped", flush=True)
    return 0
