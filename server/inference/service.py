"""The PMixED service on Ray: one budget actor, ``num_replicas`` ensemble actors, and a dispatcher.

Why plain actors and not Ray Serve: the API is our own gRPC server, so Serve's HTTP proxy and
its request router would sit unused; what we need is a fixed set of stateful replicas (each holds
the ensemble and, during Generate, a session's KV caches) plus one stateful budget keeper, which
is exactly what actors are. Generate drives a replica-side session one token per call.

The budget keeper is ONE actor per service, pinned to the node of the process that started the
service (the node where ``--ledger`` is a real path), with ``max_concurrency=1``: every spend of
every replica goes through it in turn. Its ledger is SQLite with atomic check-and-spend, so even
a second service or a ``privtune ledger`` command on the same file cannot overspend.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from privtune.common.errors import PrivtuneError
from privtune.common.pmixed.accountant import PMixedBudget
from privtune.common.pmixed.ensemble import check_p0_order
from privtune.server.inference.budget import BudgetKeeper
from privtune.server.inference.members import ServedModel
from privtune.server.inference.replica import Release, Replica, ReplicaConfig


@dataclass(frozen=True)
class ServiceConfig:
    served: ServedModel
    budget: PMixedBudget
    ledger: str
    num_replicas: int = 1
    cpus_per_replica: float = 1.0

    def __post_init__(self) -> None:
        if self.num_replicas < 1:
            raise PrivtuneError(f"--num-replicas must be at least 1, got {self.num_replicas}")
        if self.cpus_per_replica <= 0:
            raise PrivtuneError(f"--cpus-per-replica must be positive, got {self.cpus_per_replica}")


@ray.remote(num_cpus=0, max_concurrency=1)
class BudgetActor(BudgetKeeper):
    """The service's single ledger; calls run one at a time."""


class _RemoteLedger:
    """A replica's view of the budget actor (a handle is picklable; this wrapper is built inside the actor)."""

    def __init__(self, actor: ray.actor.ActorHandle) -> None:
        self.actor = actor

    def spend(self) -> int:
        return ray.get(self.actor.spend.remote())


@ray.remote
class ReplicaActor:
    def __init__(self, config: ReplicaConfig, budget_actor: ray.actor.ActorHandle) -> None:
        self.replica = Replica(config, _RemoteLedger(budget_actor))

    def info(self) -> dict[str, int]:
        return self.replica.info()

    def next_token(self, prompt: list[int]) -> Release:
        return self.replica.next_token(prompt)

    def open(self, prompt: list[int], max_new_tokens: int) -> int:
        return self.replica.open(prompt, max_new_tokens)

    def step(self, session_id: int) -> Release:
        return self.replica.step(session_id)

    def close(self, session_id: int) -> None:
        self.replica.close(session_id)


class PMixedService:
    """Starts the actors on the connected Ray cluster and routes each request to the least busy replica."""

    def __init__(self, config: ServiceConfig) -> None:
        if not ray.is_initialized():
            raise PrivtuneError(
                "Ray is not initialised; call ray.init() (privtune serve does) before starting the service"
            )
        self.config = config
        cpus = ray.cluster_resources().get("CPU", 0.0)
        if config.num_replicas * config.cpus_per_replica > cpus:
            raise PrivtuneError(
                f"{config.num_replicas} replica(s) x {config.cpus_per_replica:g} CPU need more than the Ray cluster's "
                f"{cpus:g} CPUs; lower --num-replicas or --cpus-per-replica"
            )
        BudgetKeeper(config.ledger, config.budget)  # a refused ledger fails here, with its own message
        # so do missing or corrupt adapters, and keyed members without a keyed p0
        check_p0_order(config.served.load_members(), config.served.public_embeddings is not None)
        here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
        self.budget_actor = BudgetActor.options(scheduling_strategy=here).remote(config.ledger, config.budget)
        replica_config = ReplicaConfig(config.served, config.budget, threads=max(1, int(config.cpus_per_replica)))
        self.replicas = [
            ReplicaActor.options(num_cpus=config.cpus_per_replica).remote(replica_config, self.budget_actor)
            for _ in range(config.num_replicas)
        ]
        try:
            infos = ray.get([r.info.remote() for r in self.replicas])
        except ray.exceptions.RayActorError as err:
            self.shutdown()
            raise PrivtuneError(f"a replica failed to start: {_creation_error(err)}") from None
        self.n_members = infos[0]["n_members"]
        self.vocab_size = infos[0]["vocab_size"]
        self._busy = [0] * len(self.replicas)
        self._lock = threading.Lock()

    @contextmanager
    def _replica(self) -> Iterator[ray.actor.ActorHandle]:
        with self._lock:
            index = min(range(len(self.replicas)), key=self._busy.__getitem__)
            self._busy[index] += 1
        try:
            yield self.replicas[index]
        finally:
            with self._lock:
                self._busy[index] -= 1

    def next_token(self, prompt: list[int]) -> Release:
        with self._replica() as replica:
            return ray.get(replica.next_token.remote(prompt))

    def generate(self, prompt: list[int], max_new_tokens: int, eos_token_id: int | None = None) -> Iterator[Release]:
        """Tokens one at a time from one replica (it holds the KV caches); stopping early spends nothing more."""
        with self._replica() as replica:
            session = ray.get(replica.open.remote(prompt, max_new_tokens))
            try:
                for _ in range(max_new_tokens):
                    release = ray.get(replica.step.remote(session))
                    yield release
                    if release.token == eos_token_id:
                        return
            finally:
                replica.close.remote(session)

    def budget_status(self) -> dict[str, Any]:
        return ray.get(self.budget_actor.status.remote())

    def health(self) -> dict[str, Any]:
        alive = ray.get([r.info.remote() for r in self.replicas], timeout=30)
        return {
            "replicas": len(alive),
            "n_members": self.n_members,
            "model": self.config.served.model,
            "vocab_size": self.vocab_size,
        }

    def shutdown(self) -> None:
        for actor in [*self.replicas, self.budget_actor]:
            ray.kill(actor)


def _creation_error(err: ray.exceptions.RayActorError) -> str:
    """The last line of the constructor's traceback Ray reports (e.g. an adapter that does not fit), unprefixed."""
    last = str(err).strip().splitlines()[-1]
    return re.sub(r"^[\w.]+(Error|Exception): ", "", last)
