"""One serving replica: the ensemble in memory, answering queries only after the ledger paid for them.

The replica, not the front end, charges the ledger: whatever reaches a replica (the gRPC front end,
or anyone holding its Ray handle) gets a token only after a successful check-and-spend, and the
spend happens before the token is computed, so a crash between the two can only waste budget,
never release an unpaid token.

Generate is driven one token per call (``open`` / ``step`` / ``close``) rather than as a Ray
streaming generator: the front end then asks for a token only when its client is still there, so
a client that hangs up stops the spending at once (a cancelled generator on a synchronous actor
can neither be stopped between yields nor unblocked from back-pressure).

A replica computes where ``device`` says (:mod:`privtune.common.device`): on CUDA the base model
and every member's weights sit on the GPU in bf16, while the PMixED mechanism (projection and the
exact float64 sampler) runs on the host as on a CPU replica.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from privtune.common.device import DevicePolicy, check_fits, parameter_count
from privtune.common.errors import PrivtuneError
from privtune.common.models import load_model
from privtune.common.pmixed.accountant import PMixedBudget
from privtune.common.pmixed.ensemble import Ensemble, EnsembleSession
from privtune.server.inference.members import ServedModel


class Spender(Protocol):
    def spend(self) -> int:
        """Charge one query; return the queries left, or raise BudgetExceededError."""
        ...


@dataclass(frozen=True)
class ReplicaConfig:
    served: ServedModel
    budget: PMixedBudget
    threads: int = 1
    device: str = "auto"


@dataclass(frozen=True)
class Release:
    """A released token and the queries left after it (data-independent, safe to show)."""

    token: int
    queries_remaining: int


class Replica:
    """The ensemble of one replica; Ray wraps this class in an actor (``service.ReplicaActor``)."""

    def __init__(self, config: ReplicaConfig, ledger: Spender) -> None:
        torch.set_num_threads(max(1, config.threads))
        self.config = config
        self.ledger = ledger
        loaded = load_model(config.served.model)
        self.ensemble = Ensemble(
            loaded.model, config.served.load_members(), config.served.load_public_embeddings(loaded.model)
        )
        _place(self.ensemble, DevicePolicy.resolve(config.device), config.served.model)
        if self.ensemble.n_members != config.budget.n_members:
            raise PrivtuneError(
                f"the budget was computed for {config.budget.n_members} members, {self.ensemble.n_members} were loaded"
            )
        self.vocab_size = int(loaded.model.get_output_embeddings().weight.shape[0])  # type: ignore[operator]
        self._sessions: dict[int, EnsembleSession] = {}
        self._next_id = 0

    def info(self) -> dict[str, int]:
        return {"n_members": self.ensemble.n_members, "vocab_size": self.vocab_size}

    def _session(self, prompt: list[int], new_tokens: int) -> EnsembleSession:
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise PrivtuneError(
                f"prompt token ids {bad[:5]} are outside the model's vocabulary 0..{self.vocab_size - 1}"
            )
        limit = self.ensemble.max_positions
        if limit and len(prompt) + new_tokens > limit:
            raise PrivtuneError(
                f"prompt ({len(prompt)} tokens) + {new_tokens} new tokens exceeds the model's {limit} positions; "
                "shorten the prompt or ask for fewer tokens"
            )
        return self.ensemble.session(prompt)

    def next_token(self, prompt: list[int]) -> Release:
        session = self._session(prompt, 1)
        remaining = self.ledger.spend()
        return Release(session.private_next_token(self.config.budget), remaining)

    def open(self, prompt: list[int], max_new_tokens: int) -> int:
        """Start a Generate session (no spend yet); tokens then come one :meth:`step` at a time."""
        if max_new_tokens < 1:
            raise PrivtuneError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        session = self._session(prompt, max_new_tokens)
        if max_new_tokens * self.config.budget.q >= 1:
            # Each member is then more likely than not to be sampled at some point: caching the
            # prompt for all of them in one packed pass beats a catch-up pass per first sampling.
            session.prefill(range(self.ensemble.n_members))
        self._next_id += 1
        self._sessions[self._next_id] = session
        return self._next_id

    def step(self, session_id: int) -> Release:
        """Pay for and release the session's next token, and keep it as context for the one after."""
        session = self._sessions.get(session_id)
        if session is None:
            raise PrivtuneError(f"no open generation session {session_id} on this replica")
        remaining = self.ledger.spend()
        token = session.private_next_token(self.config.budget)
        session.extend([token])
        return Release(token, remaining)

    def close(self, session_id: int) -> None:
        self._sessions.pop(session_id, None)


def _place(ensemble: Ensemble, policy: DevicePolicy, what: str) -> None:
    """The ensemble onto the policy's device (bf16 weights on CUDA), after checking that it fits there."""
    if policy.device.type == "cpu":
        return
    held = parameter_count(ensemble.base) + ensemble.extra_bytes() // 4  # built in float32 on the host
    check_fits(held, policy.weights_dtype, policy.device, f"the ensemble of {what} ({ensemble.n_members} members)")
    ensemble.to(policy.device, policy.weights_dtype)
