"""The PMixED service on Ray: one budget actor, ``num_replicas`` ensemble actors, and a dispatcher.

Why plain actors and not Ray Serve: the API is our own gRPC server, so Serve's HTTP proxy and
its request router would sit unused; what we need is a fixed set of stateful replicas (each holds
the ensemble and, during Generate, a session's KV caches) plus one stateful budget keeper, which
is exactly what actors are. Generate drives a replica-side session one token per call.

The budget keeper is ONE actor per service, pinned to the node of the process that started the
service (the node where ``--ledger`` is a real path), with ``max_concurrency=1``: every spend of
every replica goes through it in turn. Its ledger is SQLite with atomic check-and-spend, so even
a second service or a ``privtune ledger`` command on the same file cannot overspend.

Availability: Ray restarts a replica or the budget keeper that dies (``max_restarts``); the keeper's
state is the ledger file, so a restarted keeper goes on from what was spent. While an actor is down
the router skips it (a watcher thread brings it back once it answers again), a request that hit it
is answered UNAVAILABLE with a plain message (never Ray's text, which names actor ids, PIDs and node
addresses), and no token is released without a spend: a spend that cannot reach the keeper fails.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any, TypeAlias, TypeVar

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from privtune.common.errors import PrivtuneError
from privtune.common.ledger.registry import default_registry
from privtune.common.pmixed.accountant import PMixedBudget
from privtune.common.pmixed.ensemble import check_p0_order
from privtune.server.inference.budget import BudgetKeeper, member_artefacts
from privtune.server.inference.members import ServedModel
from privtune.server.inference.replica import Release, Replica, ReplicaConfig

Handle: TypeAlias = Any
"""A Ray actor handle. Ray types a handle's method attributes as ``Never`` (typed calls need
``@ray.method`` on each method), which would make mypy treat all code after a call as unreachable."""


@dataclass(frozen=True)
class ServiceConfig:
    served: ServedModel
    budget: PMixedBudget
    ledger: str
    num_replicas: int = 1
    cpus_per_replica: float = 1.0
    registry: str = field(default_factory=lambda: str(default_registry()))
    device: str = "auto"
    gpus_per_replica: float = 1.0

    def __post_init__(self) -> None:
        if self.num_replicas < 1:
            raise PrivtuneError(f"--num-replicas must be at least 1, got {self.num_replicas}")
        if self.cpus_per_replica <= 0:
            raise PrivtuneError(f"--cpus-per-replica must be positive, got {self.cpus_per_replica}")
        if not 0 < self.gpus_per_replica <= 1:
            raise PrivtuneError(f"--gpus-per-replica must be in (0, 1], got {self.gpus_per_replica}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise PrivtuneError(
                f"--device {self.device!r}: replicas take auto, cpu or cuda (Ray assigns each replica its GPU)"
            )


def replica_resources(config: ServiceConfig, cluster: dict[str, float]) -> dict[str, float]:
    """What each replica asks Ray for: its CPUs, and ``gpus_per_replica`` of a GPU when replicas
    compute on CUDA (``cuda``, or ``auto`` on a cluster with GPUs). Ray then sets each replica's
    CUDA_VISIBLE_DEVICES, so inside the actor its GPU is ``cuda``."""
    return {"num_cpus": config.cpus_per_replica, "num_gpus": _replica_gpus(config, cluster.get("GPU", 0.0))}


def _replica_gpus(config: ServiceConfig, gpus: float) -> float:
    if config.device == "cpu" or (config.device == "auto" and gpus == 0):
        return 0.0
    if config.num_replicas * config.gpus_per_replica > gpus:
        raise PrivtuneError(
            f"{config.num_replicas} replica(s) x {config.gpus_per_replica:g} GPU need more than the Ray cluster's "
            f"{gpus:g} GPUs; lower --num-replicas or --gpus-per-replica, or serve with --device cpu"
        )
    return config.gpus_per_replica


RESTARTS = -1  # Ray restarts a dead actor for as long as the service runs
WATCH_INTERVAL_S = 0.5
PROBE_TIMEOUT_S = 5.0
T = TypeVar("T")


class ServiceUnavailableError(PrivtuneError):
    """A replica or the budget keeper is down (Ray is restarting it); the request may be retried."""


class ReplicaDownError(ServiceUnavailableError):
    """The replica a request went to died; another replica may answer it."""


# Ray's overloads omit max_concurrency
@ray.remote(num_cpus=0, max_concurrency=1)  # type: ignore[call-overload]
class BudgetActor(BudgetKeeper):
    """The service's single ledger; calls run one at a time."""


class _RemoteLedger:
    """A replica's view of the budget actor (a handle is picklable; this wrapper is built inside the actor)."""

    def __init__(self, actor: Handle) -> None:
        self.actor = actor

    def spend(self) -> int:
        return ray.get(self.actor.spend.remote())


@ray.remote
class ReplicaActor:
    def __init__(self, config: ReplicaConfig, budget_actor: Handle) -> None:
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
    """Starts the actors on the connected Ray cluster and routes each request to the least busy live replica."""

    def __init__(self, config: ServiceConfig) -> None:
        if not ray.is_initialized():
            raise PrivtuneError(
                "Ray is not initialised; call ray.init() (privtune serve does) before starting the service"
            )
        self.config = config
        cluster = ray.cluster_resources()
        cpus = cluster.get("CPU", 0.0)
        if config.num_replicas * config.cpus_per_replica > cpus:
            raise PrivtuneError(
                f"{config.num_replicas} replica(s) x {config.cpus_per_replica:g} CPU need more than the Ray cluster's "
                f"{cpus:g} CPUs; lower --num-replicas or --cpus-per-replica"
            )
        resources = replica_resources(config, cluster)
        members = config.served.load_members()  # missing or corrupt adapters fail here
        check_p0_order(members, config.served.public_embeddings is not None)  # so do keyed members without keyed p0
        keeper_args = (config.ledger, config.budget, member_artefacts(config.served.adapters, members), config.registry)
        BudgetKeeper(*keeper_args).close()  # and a refused ledger or binding, each with its own message
        here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
        # @ray.remote classes keep their own type in Ray's stubs, without .options
        self.budget_actor: Handle = BudgetActor.options(  # type: ignore[attr-defined]
            scheduling_strategy=here, max_restarts=RESTARTS
        ).remote(*keeper_args)
        replica_config = ReplicaConfig(
            config.served,
            config.budget,
            threads=max(1, int(config.cpus_per_replica)),
            device="cuda" if resources["num_gpus"] else "cpu",
        )
        self.replicas: list[Handle] = [
            ReplicaActor.options(**resources, max_restarts=RESTARTS).remote(  # type: ignore[attr-defined]
                replica_config, self.budget_actor
            )
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
        self._down: set[int] = set()
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="replica-watcher", daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        """Bring replicas that Ray restarted back into the rotation once they answer again."""
        while not self._stopped.wait(WATCH_INTERVAL_S):
            with self._lock:
                down = sorted(self._down)
            for index in down:
                try:
                    ray.get(self.replicas[index].info.remote(), timeout=PROBE_TIMEOUT_S)
                except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                    continue
                with self._lock:
                    self._down.discard(index)

    @contextmanager
    def _replica(self) -> Iterator[Handle]:
        """The least busy live replica; one that fails with a Ray actor error is taken out of the rotation."""
        with self._lock:
            live = [i for i in range(len(self.replicas)) if i not in self._down]
            if not live:
                raise ServiceUnavailableError(
                    "every replica of the service is restarting; no token was released. Retry in a few seconds"
                )
            index = min(live, key=self._busy.__getitem__)
            self._busy[index] += 1
        try:
            yield self.replicas[index]
        except ray.exceptions.RayActorError as err:
            raise self._unavailable(index, err) from None
        finally:
            with self._lock:
                self._busy[index] -= 1

    def _unavailable(self, index: int, err: ray.exceptions.RayActorError) -> ServiceUnavailableError:
        if isinstance(err, ray.exceptions.RayTaskError):  # the replica lives; the budget keeper it called does not
            return ServiceUnavailableError(
                "the service's privacy budget keeper is restarting; no token was released. Retry in a few seconds"
            )
        with self._lock:
            self._down.add(index)
        return ReplicaDownError(
            "the replica serving this request stopped and is restarting; no further token was released. Retry"
        )

    def _on_any_replica(self, call: Callable[[Handle], T]) -> T:
        """``call`` on a live replica, again on another if the first one turns out dead (each try pays first)."""
        for attempt in range(len(self.replicas)):
            try:
                with self._replica() as replica:
                    return call(replica)
            except ReplicaDownError:
                if attempt == len(self.replicas) - 1:
                    raise
        raise AssertionError("unreachable: the last attempt returns or raises")

    def next_token(self, prompt: list[int]) -> Release:
        return self._on_any_replica(lambda replica: ray.get(replica.next_token.remote(prompt)))

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
        try:
            return ray.get(self.budget_actor.status.remote())
        except ray.exceptions.RayActorError:
            raise ServiceUnavailableError(
                "the service's privacy budget keeper is restarting; retry in a few seconds"
            ) from None

    def health(self) -> dict[str, Any]:
        """Serving while at least one replica answers; ``replicas`` counts those that do."""
        alive = 0
        for replica in self.replicas:
            try:
                ray.get(replica.info.remote(), timeout=PROBE_TIMEOUT_S)
                alive += 1
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                continue
        return {
            "replicas": alive,
            "n_members": self.n_members,
            "model": self.config.served.model,
            "vocab_size": self.vocab_size,
        }

    def shutdown(self) -> None:
        """Stop the watcher and the actors; the budget keeper first closes its ledger (WAL folded in)."""
        if hasattr(self, "_watcher"):  # absent when a replica failed to start
            self._stopped.set()
            self._watcher.join(timeout=PROBE_TIMEOUT_S + WATCH_INTERVAL_S)
        # a keeper that is down has nothing open; its WAL is folded in by the next open
        with suppress(ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            ray.get(self.budget_actor.close.remote(), timeout=30)
        for actor in [*self.replicas, self.budget_actor]:
            ray.kill(actor)


def _creation_error(err: ray.exceptions.RayActorError) -> str:
    """The last line of the constructor's traceback Ray reports (e.g. an adapter that does not fit), unprefixed."""
    last = str(err).strip().splitlines()[-1]
    return re.sub(r"^[\w.]+(Error|Exception): ", "", last)
