"""What each kind of release means: its budget, its scope, and the sentence that states its guarantee.

Pure rules over budgets and records, apart from the SQLite store that keeps them (as Opacus keeps
its ``analysis/`` apart from its ``accountants/``). Every rule of one kind lives in its class here:

- ``ldp``: pure epsilon per document (the sum over its tokens), added up per (scope, document).
  A scope says between which inputs a mechanism's token guarantee holds (any two tokens of a
  vocabulary for SanText's metric LDP, two tokens of one cell for CusText): amounts of different
  scopes are different promises and are never added together, each is capped by the budget alone.
- ``dpsgd``: (epsilon, delta) from the RDP accountant for all training steps so far; each round
  sets the new cumulative value.
- ``pmixed``: Renyi DP at one fixed order alpha, added up per query; the budget is the RDP that a
  target (epsilon, delta) allows at that order, reported back as (epsilon, delta).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from privtune.common.errors import PrivtuneError
from privtune.common.privacy.rdp import check_conversion, epsilon_to_rdp, rdp_to_epsilon


@dataclass(frozen=True)
class Budget:
    kind: str
    epsilon: float
    delta: float = 0.0
    alpha: float | None = None

    def __post_init__(self) -> None:
        kind_of(self.kind).check_budget(self)

    @property
    def cap(self) -> float:
        """The budget in the kind's currency (RDP at alpha for PMixED, epsilon otherwise)."""
        return kind_of(self.kind).cap(self)

    def describe(self) -> str:
        return kind_of(self.kind).describe(self)


@dataclass(frozen=True)
class Record:
    id: int
    time: float
    kind: str
    scope: str
    subject: str
    amount: float
    total: float
    delta: float
    alpha: float | None
    details: dict = field(default_factory=dict)


class Kind(ABC):
    """The rules shared by every kind; subclasses override what differs."""

    name: ClassVar[str]
    title: ClassVar[str]
    unit: ClassVar[str]
    currency: ClassVar[str]
    scope: ClassVar[str]  # the fixed scope of kinds that have one
    cumulative: ClassVar[bool] = False

    def check_budget(self, budget: Budget) -> None:
        if not (math.isfinite(budget.epsilon) and budget.epsilon >= 0):
            raise PrivtuneError(f"{self.title} budget epsilon must be a finite number >= 0, got {budget.epsilon}")
        if budget.alpha is not None:
            raise PrivtuneError(f"{self.title} budget takes no alpha")

    def cap(self, budget: Budget) -> float:
        return budget.epsilon

    def describe(self, budget: Budget) -> str:
        return f"({budget.epsilon:g}, {budget.delta:g})-DP"

    def release_scope(self, scope: str, details: dict) -> str:
        """The scope a release is recorded under."""
        if scope and scope != self.scope:
            raise PrivtuneError(f"{self.title} releases have one scope ({self.scope}), got {scope!r}")
        return self.scope

    def legacy_scope(self, details: dict) -> str:
        """The scope of a record written before records had scopes (ledger format 1)."""
        return self.scope

    def check_release(self, alpha: float | None, delta: float, budget: Budget | None) -> None:
        if alpha is not None:
            raise PrivtuneError(f"{self.title} releases are not RDP at an order: pass no alpha")

    def budget_flags(self, budget: Budget) -> str:
        return f"--epsilon E --delta {budget.delta:g}"

    def summarise(self, scope: str, records: list[Record], budget: Budget | None) -> dict[str, Any]:
        """One guarantee: the worst subject's total in ``scope``, stated in the kind's unit."""
        totals = {r.subject: r.total for r in records}
        worst = max(totals.values(), default=0.0)
        entry: dict[str, Any] = {
            "kind": self.name,
            "title": self.title,
            "scope": scope,
            "unit": self.unit,
            "currency": self.currency,
            "releases": len(records),
            "subjects": len(totals),
            "spent": worst,
            "budget": None if budget is None else asdict(budget),
            "left": None if budget is None else max(budget.cap - worst, 0.0),
            "budget_text": "none" if budget is None else budget.describe(),
        }
        entry["left_text"] = "-" if entry["left"] is None else f"{entry['left']:.4g}"
        entry.update(self._state(worst, len(totals), records, budget))
        return entry

    @abstractmethod
    def _state(self, worst: float, subjects: int, records: list[Record], budget: Budget | None) -> dict[str, Any]:
        """This kind's figures and statement for the report."""


class Ldp(Kind):
    name = "ldp"
    title = "LDP text perturbation"
    unit = "document"
    currency = "epsilon (pure)"
    scope = ""

    def check_budget(self, budget: Budget) -> None:
        if budget.delta or budget.alpha is not None:
            raise PrivtuneError("the LDP budget is pure epsilon per document: give no delta or alpha")
        super().check_budget(budget)

    def describe(self, budget: Budget) -> str:
        return f"{budget.epsilon:g}-LDP per document (in each scope)"

    def release_scope(self, scope: str, details: dict) -> str:
        scope = scope or str(details.get("scope", ""))
        if not scope:
            raise PrivtuneError(
                "an LDP release must name its scope (between which tokens its guarantee holds, e.g. the "
                "mechanism's TokenRelease.scope): guarantees of different scopes are never added together"
            )
        return scope

    def legacy_scope(self, details: dict) -> str:
        return str(details.get("scope") or "not recorded (ledger format 1)")

    def budget_flags(self, budget: Budget) -> str:
        return "--epsilon E"

    def _state(self, worst: float, subjects: int, records: list[Record], budget: Budget | None) -> dict[str, Any]:
        token = max((float(r.details.get("token_epsilon", 0.0)) for r in records), default=0.0)
        return {
            "max_document_epsilon": worst,
            "max_token_epsilon": token,
            "unit_token": "token",
            "spent_text": f"eps {worst:.4g} (worst document)",
            "statement": (
                f"{subjects} document(s) released; each is at most {worst:.6g}-LDP (pure; the sum over its tokens "
                f"and releases of this scope), each token at most {token:.6g}-LDP; it holds only between inputs "
                f"whose tokens differ pairwise within the scope: {records[0].scope if records else '-'}; "
                "unit: one document (a token for the per-token figure)"
            ),
        }


class Dpsgd(Kind):
    name = "dpsgd"
    title = "DP-SGD fine-tuning"
    unit = "training example"
    currency = "epsilon at delta (RDP accountant)"
    scope = "one training example of the owner's data (a record or a token block: see unit), (epsilon, delta)-DP"
    cumulative = True

    def check_budget(self, budget: Budget) -> None:
        super().check_budget(budget)
        if not 0 < budget.delta < 1:
            raise PrivtuneError(f"{self.title} budget needs a delta in (0, 1), got {budget.delta}")

    def check_release(self, alpha: float | None, delta: float, budget: Budget | None) -> None:
        super().check_release(alpha, delta, budget)
        if not 0 < delta < 1:
            raise PrivtuneError(f"{self.title}: delta must be in (0, 1), got {delta}")
        if budget is not None and delta > budget.delta:
            raise PrivtuneError(
                f"{self.title}: delta {delta:g} is larger than the budget's delta {budget.delta:g}; "
                f"compute epsilon at delta <= {budget.delta:g}"
            )

    def _state(self, worst: float, subjects: int, records: list[Record], budget: Budget | None) -> dict[str, Any]:
        delta = records[-1].delta if records else (budget.delta if budget else 0.0)
        steps = sum(int(r.details.get("steps", 0)) for r in records)
        covered = sorted({str(r.details["release"]) for r in records if r.details.get("release")})
        last = records[-1].details if records else {}
        unit = str(last.get("unit", self.unit))
        unit_statement = str(last.get("unit_statement", "one training example (one token block)"))
        return {
            "unit": unit,
            "epsilon": worst,
            "delta": delta,
            "steps": steps,
            "rounds": len(records),
            "releases_covered": covered,
            "spent_text": f"eps {worst:.4g} at delta {delta:g}",
            "statement": (
                f"({worst:.6g}, {delta:g})-DP for each {unit} of this owner's data, from the RDP "
                f"accountant over all {steps} DP-SGD steps in {len(records)} round(s); unit: {unit_statement}"
                + (f"; covers: {', '.join(covered)}" if covered else "")
            ),
        }


class Pmixed(Kind):
    name = "pmixed"
    title = "PMixED private prediction"
    unit = "ensemble member's data shard"
    currency = "RDP at order alpha"
    scope = "one ensemble member's data shard, RDP at one order"

    def check_budget(self, budget: Budget) -> None:
        if not (math.isfinite(budget.epsilon) and budget.epsilon >= 0):
            raise PrivtuneError(f"{self.title} budget epsilon must be a finite number >= 0, got {budget.epsilon}")
        if budget.alpha is None:
            raise PrivtuneError("the PMixED budget needs an RDP order alpha > 1, got none")
        check_conversion(budget.delta, budget.alpha)
        if self.cap(budget) <= 0:
            raise PrivtuneError(
                f"epsilon {budget.epsilon} at delta {budget.delta} leaves no RDP at order {budget.alpha} "
                f"(rdp budget {self.cap(budget):.4g}); raise epsilon or delta, or change alpha"
            )

    def cap(self, budget: Budget) -> float:
        if budget.alpha is None:
            raise PrivtuneError("the PMixED budget needs an RDP order alpha > 1, got none")
        return epsilon_to_rdp(budget.epsilon, budget.delta, budget.alpha)

    def describe(self, budget: Budget) -> str:
        return f"({budget.epsilon:g}, {budget.delta:g})-DP = RDP {self.cap(budget):.6g} at order {budget.alpha:g}"

    def check_release(self, alpha: float | None, delta: float, budget: Budget | None) -> None:
        if alpha is None:
            raise PrivtuneError("PMixED spending is RDP at an order: pass alpha")
        if budget is not None and alpha != budget.alpha:
            raise PrivtuneError(
                f"the PMixED budget is at order {budget.alpha:g}, the release is RDP at order {alpha:g}"
            )

    def budget_flags(self, budget: Budget) -> str:
        return f"--epsilon E --delta {budget.delta:g} --alpha {budget.alpha:g}"

    def _state(self, worst: float, subjects: int, records: list[Record], budget: Budget | None) -> dict[str, Any]:
        alpha = records[0].alpha if records else (budget.alpha if budget else None)
        if alpha is None:
            raise PrivtuneError("a PMixED entry of this ledger has no RDP order alpha; the ledger file is damaged")
        queries = sum(int(r.details.get("queries", 1)) for r in records)
        state: dict[str, Any] = {"rdp": worst, "alpha": alpha, "queries": queries, "epsilon": None, "delta": None}
        as_dp = "no (epsilon, delta) conversion without a budget's delta"
        if budget is not None:
            state.update(epsilon=rdp_to_epsilon(worst, budget.delta, alpha), delta=budget.delta)
            as_dp = f"({state['epsilon']:.6g}, {budget.delta:g})-DP"
        state["spent_text"] = f"rdp {worst:.4g} at alpha {alpha:g}"
        state["statement"] = (
            f"{as_dp} for each ensemble member's data shard, from total RDP {worst:.6g} at order {alpha:g} over "
            f"{queries} answered queries; unit: one ensemble member's shard (a data owner's partition)"
        )
        return state


KINDS: dict[str, Kind] = {k.name: k for k in (Ldp(), Dpsgd(), Pmixed())}


def kind_of(name: str) -> Kind:
    try:
        return KINDS[name]
    except KeyError:
        raise PrivtuneError(f"unknown privacy release kind {name!r}; known: {', '.join(KINDS)}") from None
