"""One serving replica: the ensemble in memory, answering queries only after the ledger paid for them.

The replica, not the front end, charges the ledger: whatever reaches a replica (the gRPC front end,
or anyone holding its Ray handle) gets a token only after a successful check-and-spend, and the
spend happens before the token is computed, so a crash between the two can only waste budget,
never release an unpaid token.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from common.errors import PrivtuneError
from common.models import load_model
from common.pmixed.accountant import PMixedBudget
from common.pmixed.ensemble import Ensemble, EnsembleSession
from server.inference.members import ServedModel


class Spender(Protocol):
    def spend(self) -> int:
        """Charge one query; return the queries left, or raise BudgetExceededError."""
        ...


@dataclass(frozen=True)
class ReplicaConfig:
    served: ServedModel
    budget: PMixedBudget
    threads: int = 1


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
        self.ensemble = Ensemble(loaded.model, config.served.load_members())
        if self.ensemble.n_members != config.budget.n_members:
            raise PrivtuneError(
                f"the budget was computed for {config.budget.n_members} members, {self.ensemble.n_members} were loaded"
            )
        self.eos_token_id = loaded.tokenizer.eos_token_id
        self.vocab_size = int(loaded.model.get_output_embeddings().weight.shape[0])

    def info(self) -> dict[str, int]:
        return {"n_members": self.ensemble.n_members, "vocab_size": self.vocab_size}

    def _session(self, prompt: list[int], new_tokens: int) -> EnsembleSession:
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise PrivtuneError(f"prompt token ids {bad[:5]} are outside the model's vocabulary 0..{self.vocab_size - 1}")
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

    def generate(self, prompt: list[int], max_new_tokens: int, stop_at_eos: bool) -> Iterator[Release]:
        """Yield tokens one by one, each paid before it is computed; the caches persist across them."""
        if max_new_tokens < 1:
            raise PrivtuneError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        session = self._session(prompt, max_new_tokens)
        for _ in range(max_new_tokens):
            remaining = self.ledger.spend()
            token = session.private_next_token(self.config.budget)
            yield Release(token, remaining)
            if stop_at_eos and token == self.eos_token_id:
                return
            session.extend([token])
