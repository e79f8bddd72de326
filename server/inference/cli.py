"""``privtune serve``: start Ray (or join a cluster), the PMixED replicas and the gRPC API.

:class:`ServeConfig` is what a service starts from: the CLI parses its arguments into one, and a
program (the demo, tests) builds one directly and calls :func:`start`.
"""

from __future__ import annotations

import argparse
import math
import signal
import threading
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from privtune.common.errors import PrivtuneError
from privtune.common.ledger.registry import default_registry
from privtune.common.paths import cache_dir
from privtune.common.pmixed.accountant import ORDERS, PROJECTIONS, PMixedBudget, best_budget
from privtune.server.inference.members import ServedModel, from_arguments

if TYPE_CHECKING:
    from privtune.server.inference.service import PMixedService, ServiceConfig

DEFAULT_LEDGER_NAME = "pmixed-ledger.sqlite"
DEFAULT_Q = {"box": 1.0, "renyi": 0.03}
"""The box needs no empty subsets (every member, every query); the Rényi ball's bound rests on them."""
LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}


@dataclass(frozen=True)
class ServeConfig:
    """Everything ``privtune serve`` starts from (defaults = the CLI's defaults)."""

    # what to serve
    run: str | None = None
    model: str | None = None
    adapters: tuple[str, ...] = ()
    public_embeddings: str | None = None
    # privacy budget (PMixED)
    epsilon: float = 8.0
    delta: float = 1e-5
    alpha: int | None = None  # None: the order of ORDERS that gives the members the most room (accountant only)
    queries: int = 1024
    q: float | None = None  # None: DEFAULT_Q of the projection
    projection: str = "box"
    split: float = 0.85  # the box's share of its width above p0: bench.utility's choice on public data (Milton)
    ledger: str | None = None
    registry: str | None = None  # which ledger pays for which members; default: the privtune cache's
    # Ray
    address: str | None = None
    num_cpus: int | None = None
    num_replicas: int = 1
    cpus_per_replica: float = 1.0
    device: str = "auto"
    gpus_per_replica: float = 1.0
    # network and TLS
    host: str = "127.0.0.1"
    port: int = 50051
    tls_cert: str | None = None
    tls_key: str | None = None
    insecure: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServeConfig:
        given = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
        return cls(**{**given, "adapters": tuple(args.adapters or ())})


DEFAULTS = ServeConfig()


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def configure(parser: argparse.ArgumentParser) -> None:
    what = parser.add_argument_group("what to serve")
    what.add_argument("--run", help="a federated run folder (base model from its metrics.json, members from adapters/)")
    what.add_argument(
        "--model",
        help="base model (public p0): tiny-gpt2 | tiny-llama | tiny-opt | smollm2 | HF folder; "
        "with --run it overrides the run's model",
    )
    what.add_argument(
        "--adapters", nargs="+", metavar="DIR", help="member adapter folders (peft folders + privtune's manifest.json)"
    )
    what.add_argument(
        "--public-embeddings",
        metavar="FILE",
        help="ULT-keyed members only: p0's embedding rows in the federation key's order, from a key "
        "holder's 'privtune ult keyed-public'",
    )
    budget = parser.add_argument_group("privacy budget (PMixED)")
    budget.add_argument(
        "--epsilon", type=_finite, default=DEFAULTS.epsilon, help="total epsilon over all queries (default 8)"
    )
    budget.add_argument("--delta", type=_finite, default=DEFAULTS.delta, help="delta (default 1e-5)")
    budget.add_argument(
        "--projection",
        choices=PROJECTIONS,
        default=DEFAULTS.projection,
        help="how each member is kept close to the public model: 'box' (every token's probability within "
        "[e^-a, e^b] x p0's, the default) or 'renyi' (the two-sided Renyi ball)",
    )
    budget.add_argument(
        "--alpha",
        type=int,
        default=DEFAULTS.alpha,
        help=f"Renyi order of the accounting (default: the one of {list(ORDERS)} that gives the members the most "
        "room for this budget; a restarted service must keep its ledger's order)",
    )
    budget.add_argument(
        "--queries",
        "-T",
        dest="queries",
        type=int,
        default=DEFAULTS.queries,
        help="queries (= released tokens) the budget is split over (default 1024)",
    )
    budget.add_argument(
        "--q",
        type=_finite,
        default=DEFAULTS.q,
        help="Poisson subsampling rate of members (default 1 for the box: every member each query; 0.03 for renyi)",
    )
    budget.add_argument(
        "--split",
        type=_finite,
        default=DEFAULTS.split,
        help=f"box only: the share b / (a + b) of the box's width above p0 (default {DEFAULTS.split})",
    )
    budget.add_argument(
        "--ledger",
        help=f"ledger file shared by all replicas (default RUN/{DEFAULT_LEDGER_NAME}, or one in the privtune cache); "
        "the members are bound to it: no other ledger may serve them",
    )
    budget.add_argument(
        "--ledger-registry",
        dest="registry",
        metavar="FILE",
        help="the record of which ledger pays for which members (default: one per user in the privtune cache)",
    )
    ray_group = parser.add_argument_group("Ray and network")
    ray_group.add_argument(
        "--address", help="existing Ray cluster (e.g. ray://host:10001 or 'auto'); default: start one"
    )
    ray_group.add_argument("--num-cpus", type=int, help="CPUs of the local Ray instance (default: all)")
    ray_group.add_argument(
        "--num-replicas", type=int, default=DEFAULTS.num_replicas, help="ensemble replicas (default 1)"
    )
    ray_group.add_argument(
        "--cpus-per-replica", type=_finite, default=DEFAULTS.cpus_per_replica, help="CPUs (torch threads) per replica"
    )
    ray_group.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default=DEFAULTS.device,
        help="where replicas compute (default auto: on GPUs when the Ray cluster has them)",
    )
    ray_group.add_argument(
        "--gpus-per-replica",
        type=_finite,
        default=DEFAULTS.gpus_per_replica,
        help="share of a GPU each replica reserves on CUDA (default 1; 0.5 puts two replicas on a GPU)",
    )
    ray_group.add_argument("--host", default=DEFAULTS.host, help="address to listen on (default 127.0.0.1)")
    ray_group.add_argument(
        "--port", type=int, default=DEFAULTS.port, help="gRPC port (default 50051; 0 = any free port)"
    )
    tls = parser.add_argument_group("TLS (required off loopback; deploy/certs.sh makes the files)")
    tls.add_argument("--tls-cert", metavar="PEM", help="server certificate chain, e.g. deploy/certs/server.pem")
    tls.add_argument("--tls-key", metavar="KEY", help="its private key, e.g. deploy/certs/server.key")
    tls.add_argument(
        "--insecure",
        action="store_true",
        help="serve plaintext on a non-loopback --host (prompts and tokens cross the network readable)",
    )


def ledger_path(config: ServeConfig, served: ServedModel) -> Path:
    """--ledger, else the run's own ledger, found from its members (so RUN and its --out folder give one file)."""
    if config.ledger:
        return Path(config.ledger).expanduser()
    if config.run:
        return Path(served.adapters[0]).resolve().parent.parent / DEFAULT_LEDGER_NAME
    return cache_dir("ledgers") / DEFAULT_LEDGER_NAME


def service_config(config: ServeConfig) -> ServiceConfig:
    from privtune.server.inference.service import ServiceConfig

    served = from_arguments(config.run, config.model, list(config.adapters) or None, config.public_embeddings)
    return ServiceConfig(
        served,
        serving_budget(config, served.n_members),
        str(ledger_path(config, served)),
        config.num_replicas,
        config.cpus_per_replica,
        config.registry or str(default_registry()),
        config.device,
        config.gpus_per_replica,
    )


def serving_budget(config: ServeConfig, n_members: int) -> PMixedBudget:
    """The config's budget; without --alpha, at the order that gives the members the most room (data-independent)."""
    if config.projection not in DEFAULT_Q:
        raise PrivtuneError(f"unknown PMixED projection {config.projection!r}; choose one of {', '.join(PROJECTIONS)}")
    q = DEFAULT_Q[config.projection] if config.q is None else config.q
    if config.alpha is None:
        return best_budget(config.epsilon, config.delta, config.queries, q, n_members, config.projection, config.split)
    return PMixedBudget(
        config.epsilon, config.delta, config.alpha, config.queries, q, n_members, config.projection, config.split
    )


def server_credentials(config: ServeConfig) -> grpc.ServerCredentials | None:
    """TLS credentials from --tls-cert/--tls-key; None (plaintext) only on loopback or with --insecure."""
    if bool(config.tls_cert) != bool(config.tls_key):
        raise PrivtuneError("give both --tls-cert and --tls-key (deploy/certs.sh writes server.pem and server.key)")
    if not config.tls_cert or not config.tls_key:
        if config.host not in LOOPBACK and not config.insecure:
            raise PrivtuneError(
                f"--host {config.host} is reachable from the network and no TLS was given: prompts and released "
                "tokens would travel in plaintext. Give --tls-cert/--tls-key (deploy/certs.sh --host NAME makes "
                "them), or --insecure to accept that"
            )
        return None
    try:
        chain, key = Path(config.tls_cert).read_bytes(), Path(config.tls_key).read_bytes()
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


def start(config: ServeConfig) -> Running:
    import ray

    from privtune.common.models import load_tokenizer
    from privtune.server.inference.grpc_api import start_server
    from privtune.server.inference.service import PMixedService

    service_cfg = service_config(config)
    credentials = server_credentials(config)
    owns_ray = not ray.is_initialized()
    if owns_ray:
        ray.init(
            address=config.address,
            num_cpus=None if config.address else config.num_cpus,
            include_dashboard=False,
            namespace="privtune",
            log_to_driver=False,
        )
    try:
        service = PMixedService(service_cfg)
        tokenizer = load_tokenizer(service_cfg.served.model)
        server, port = start_server(service, tokenizer, config.host, config.port, credentials)
    except BaseException:
        if owns_ray:
            ray.shutdown()
        raise
    return Running(server, port, service, owns_ray)


def run(args: argparse.Namespace) -> int:
    config = ServeConfig.from_args(args)
    running = start(config)
    budget = running.service.budget_status()
    print(
        f"privtune serve: {running.service.n_members} members of {running.service.config.served.model} on "
        f"{config.num_replicas} replica(s), gRPC{' (TLS)' if config.tls_cert else ''} on "
        f"{config.host}:{running.port}; budget {budget['queries_left']} of "
        f"{budget['queries_total']} queries left (({budget['epsilon']:g}, {budget['delta']:g})-DP at order "
        f"{budget['alpha']}, {budget['projection']} projection, q={budget['q']:g}; ledger {budget['ledger']}); "
        "Ctrl-C stops",
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
