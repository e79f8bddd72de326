"""The service's privacy budget: one PMixED ledger entry, spent one query per released token.

Each query costs the per-query RDP at order α that the projection's constraint (the Rényi ball's
β or the box's width) was solved for (``PMixedBudget``); its ledger entry names the projection. The
ledger holds the (ε, δ, α) budget and refuses, atomically, the spend that would exceed it. Because
what is added up is RDP at one order, a restart with another T, q or projection is still accounted
correctly: each query spends what it actually cost. A restart with another (ε, δ, α) is refused, so a budget
cannot be reset by accident by changing flags; raising it is a deliberate ledger command.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from privtune.common.errors import BudgetExceededError, PrivtuneError
from privtune.common.ledger import RELATIVE_TOLERANCE, Ledger
from privtune.common.ledger.registry import bind
from privtune.common.offsite.digest import tensors_digest
from privtune.common.pmixed.accountant import PMixedBudget
from privtune.common.pmixed.ensemble import MemberAdapter
from privtune.common.privacy.rdp import rdp_to_epsilon

KIND = "pmixed"
LEDGER_OWNER = "pmixed-service"


def member_artefacts(folders: tuple[str, ...], members: list[MemberAdapter]) -> dict[str, str]:
    """Each member's content hash (of its adapter tensors) -> its folder, for the ledger binding.

    Content, not paths: the same members reached through another path or copied elsewhere are the
    same data, paid for by the same ledger.
    """
    return {tensors_digest(member.state): folder for folder, member in zip(folders, members, strict=True)}


class BudgetKeeper:
    """Check-and-spend on the ledger file; ``service.BudgetActor`` is this class as one Ray actor.

    The ledger is bound to the members it pays for (``registry``): no second ledger can serve them.
    """

    def __init__(self, ledger_path: str, budget: PMixedBudget, artefacts: dict[str, str], registry: str) -> None:
        if not float(budget.alpha).is_integer():
            raise PrivtuneError(
                f"the service reports its Rényi order as an integer; alpha={budget.alpha} is not one (use e.g. 4)"
            )
        self.budget = budget
        self.ledger = Ledger(ledger_path, owner=LEDGER_OWNER)
        bind(Path(registry), self.ledger, artefacts)
        stored = self.ledger.budget(KIND)
        wanted = (float(budget.epsilon), float(budget.delta), float(budget.alpha))
        if stored is None:
            self.ledger.set_budget(KIND, budget.epsilon, delta=budget.delta, alpha=budget.alpha)
        elif (stored.epsilon, stored.delta, stored.alpha) != wanted:
            raise PrivtuneError(
                f"ledger {self.ledger.path} holds a PMixED budget of {stored.describe()}, the service was started with "
                f"epsilon={budget.epsilon:g} delta={budget.delta:g} alpha={budget.alpha}; start it with the ledger's "
                f"values, or change it deliberately with 'privtune ledger budget {self.ledger.path} pmixed ...' "
                "(another ledger cannot serve these members: they are bound to this one)"
            )
        kept = self.ledger.budget(KIND)
        if kept is None:
            raise PrivtuneError(f"ledger {self.ledger.path} holds no PMixED budget after setting it; is it writable?")
        self.cap = kept.cap
        self.per_query = budget.rdp_per_query()

    def _queries_left(self, spent_rdp: float) -> int:
        # The ledger accepts a spend while the total stays within cap * (1 + tolerance).
        return max(0, math.floor((self.cap * (1 + RELATIVE_TOLERANCE) - spent_rdp) / self.per_query))

    def close(self) -> None:
        """A clean shutdown: the ledger's WAL is folded into its file and its marker updated."""
        self.ledger.close()

    def spend(self) -> int:
        """Charge one query; returns the queries left after it, or raises BudgetExceededError."""
        try:
            record = self.ledger.spend(
                KIND,
                self.per_query,
                alpha=float(self.budget.alpha),
                details={"queries": 1, "projection": self.budget.projection},
            )
        except BudgetExceededError:
            raise BudgetExceededError(self._exhausted_message()) from None
        return self._queries_left(record.total)

    def _exhausted_message(self) -> str:
        status = self.status()
        b = self.budget
        return (
            f"privacy budget exhausted: {status['queries_spent']} of {status['queries_total']} queries spent "
            f"(RDP {status['rdp_spent']:.6g} of {status['rdp_total']:.6g} at order {b.alpha}, i.e. "
            f"({b.epsilon:g}, {b.delta:g})-DP for each member's data; ledger {self.ledger.path}). No token was "
            "released. A new budget needs the model owner: either accept a larger total epsilon with "
            f"'privtune ledger budget {self.ledger.path} pmixed --epsilon E --delta {b.delta:g} --alpha {b.alpha}' "
            "and restart with --epsilon E, or serve members trained on fresh data with a new --ledger"
        )

    def status(self) -> dict[str, Any]:
        """What was granted and what is spent; all of it is data-independent."""
        records = self.ledger.records(KIND)
        spent_rdp = records[-1].total if records else 0.0
        spent_queries = sum(int(r.details.get("queries", 1)) for r in records)
        left = self._queries_left(spent_rdp)
        b = self.budget
        return {
            "epsilon": b.epsilon,
            "delta": b.delta,
            "alpha": int(b.alpha),
            "queries_total": spent_queries + left,
            "queries_spent": spent_queries,
            "queries_left": left,
            "rdp_total": self.cap,
            "rdp_spent": spent_rdp,
            "epsilon_spent": rdp_to_epsilon(spent_rdp, b.delta, b.alpha),
            "n_members": b.n_members,
            "q": b.q,
            **b.parameters(),
            "ledger": str(self.ledger.path),
            "exhausted": left == 0,
        }
