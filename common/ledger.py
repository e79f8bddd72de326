"""The privacy ledger: every release of private information, its guarantee, and the budget it counts against.

One ledger per data owner (LDP text releases, DP-SGD training) and one for the inference service
(PMixED queries). It is a SQLite file so that it persists across restarts and so that several
processes (the Ray replicas of the inference service) can spend from ONE budget: every
check-and-spend runs in a ``BEGIN IMMEDIATE`` transaction (read the total, compare with the budget,
insert, commit), which SQLite serialises across processes. A refused release records nothing.

Kinds and what their numbers mean:

- ``ldp``: pure epsilon per document (the sum over its tokens), added up per subject (document id);
  the budget caps each document's total.
- ``dpsgd``: (epsilon, delta) from the RDP accountant for all training steps so far. It is not a sum
  over rounds: each round sets the new cumulative value (``set_cumulative``).
- ``pmixed``: Renyi DP at one fixed order alpha, added up per query; the budget is the RDP that a
  target (epsilon, delta) allows at that order (``rdp_budget``), reported back as (epsilon, delta).
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from privtune.common.errors import BudgetExceededError, PrivtuneError

FORMAT = "privtune-ledger"
VERSION = "1"
RELATIVE_TOLERANCE = 1e-9  # lets exactly T spends of budget/T fit despite float summation
BUSY_TIMEOUT_S = 60.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS budgets (kind TEXT PRIMARY KEY, epsilon REAL NOT NULL, delta REAL NOT NULL, alpha REAL);
CREATE TABLE IF NOT EXISTS records (
    id INTEGER PRIMARY KEY AUTOINCREMENT, time REAL NOT NULL, kind TEXT NOT NULL, subject TEXT NOT NULL,
    amount REAL NOT NULL, total REAL NOT NULL, delta REAL NOT NULL, alpha REAL, details TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS records_by_subject ON records (kind, subject, id);
"""


@dataclass(frozen=True)
class Kind:
    name: str
    title: str
    unit: str
    currency: str
    cumulative: bool


KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        Kind("ldp", "LDP text perturbation", "document", "epsilon (pure)", cumulative=False),
        Kind("dpsgd", "DP-SGD fine-tuning", "training example", "epsilon at delta (RDP accountant)", cumulative=True),
        Kind(
            "pmixed",
            "PMixED private prediction",
            "ensemble member's data shard",
            "RDP at order alpha",
            cumulative=False,
        ),
    )
}


def rdp_budget(epsilon: float, delta: float, alpha: float) -> float:
    """Total RDP at order alpha that still converts to (epsilon, delta)-DP.

    Inverse of the conversion eps = rdp + ln((a-1)/a) - (ln delta + ln a)/(a-1) (Balle et al. 2020,
    Thm. 21), as DESIGN.md states it for PMixED.
    """
    return epsilon - math.log((alpha - 1.0) / alpha) + (math.log(delta) + math.log(alpha)) / (alpha - 1.0)


def rdp_to_epsilon(rdp: float, delta: float, alpha: float) -> float:
    """The epsilon at ``delta`` that a total RDP of ``rdp`` at order ``alpha`` guarantees."""
    return rdp + math.log((alpha - 1.0) / alpha) - (math.log(delta) + math.log(alpha)) / (alpha - 1.0)


@dataclass(frozen=True)
class Budget:
    kind: str
    epsilon: float
    delta: float = 0.0
    alpha: float | None = None

    def __post_init__(self) -> None:
        kind = _kind(self.kind)
        if not (self.epsilon >= 0 and math.isfinite(self.epsilon)):
            raise PrivtuneError(f"{kind.title} budget epsilon must be a finite number >= 0, got {self.epsilon}")
        if kind.name == "ldp" and (self.delta or self.alpha is not None):
            raise PrivtuneError("the LDP budget is pure epsilon per document: give no delta or alpha")
        if kind.name in ("dpsgd", "pmixed") and not 0 < self.delta < 1:
            raise PrivtuneError(f"{kind.title} budget needs a delta in (0, 1), got {self.delta}")
        if kind.name == "pmixed":
            if self.alpha is None or not self.alpha > 1:
                raise PrivtuneError(f"the PMixED budget needs an RDP order alpha > 1, got {self.alpha}")
            if self.cap <= 0:
                raise PrivtuneError(
                    f"epsilon {self.epsilon} at delta {self.delta} leaves no RDP at order {self.alpha} "
                    f"(rdp budget {self.cap:.4g}); raise epsilon or delta, or change alpha"
                )
        elif self.alpha is not None:
            raise PrivtuneError(f"{kind.title} budget takes no alpha")

    @property
    def cap(self) -> float:
        """The budget in the kind's currency (RDP at alpha for PMixED, epsilon otherwise)."""
        if self.kind == "pmixed":
            return rdp_budget(self.epsilon, self.delta, self.alpha)
        return self.epsilon

    def describe(self) -> str:
        if self.kind == "pmixed":
            return f"({self.epsilon:g}, {self.delta:g})-DP = RDP {self.cap:.6g} at order {self.alpha:g}"
        if self.kind == "dpsgd":
            return f"({self.epsilon:g}, {self.delta:g})-DP"
        return f"{self.epsilon:g}-LDP per document"


@dataclass(frozen=True)
class Record:
    id: int
    time: float
    kind: str
    subject: str
    amount: float
    total: float
    delta: float
    alpha: float | None
    details: dict = field(default_factory=dict)


def _kind(name: str) -> Kind:
    try:
        return KINDS[name]
    except KeyError:
        raise PrivtuneError(f"unknown privacy release kind {name!r}; known: {', '.join(KINDS)}") from None


class Ledger:
    """A privacy ledger file, shared safely by every process and thread that opens it.

    The file is in SQLite's WAL mode with ``synchronous=FULL``: a commit is one durable append
    (~2 ms where an fsync costs that), readers never block the writer, and a crash loses no
    committed spend. WAL needs the processes on one host (not a network file system). Each process
    keeps one connection (reopened after a fork, dropped when pickled to a Ray worker).
    """

    def __init__(self, path: str | Path, owner: str | None = None, *, create: bool = True) -> None:
        self.path = Path(path).expanduser()
        self._connection: sqlite3.Connection | None = None
        self._pid = 0
        self._lock = threading.Lock()
        if not self.path.exists() and not create:
            raise PrivtuneError(
                f"no privacy ledger at {self.path}; check the path (ledgers are created by the "
                "first release or by 'privtune ledger budget')"
            )
        with self._transaction() as con:
            for statement in SCHEMA.strip().split(";"):
                if statement.strip():
                    con.execute(statement)
            stored = dict(con.execute("SELECT key, value FROM meta").fetchall())
            if stored and stored.get("format") != FORMAT:
                raise PrivtuneError(f"{self.path} is a SQLite file but not a privtune ledger")
            if stored.get("owner") and owner is not None and stored["owner"] != owner:
                raise PrivtuneError(
                    f"ledger {self.path} belongs to {stored['owner']!r}, not {owner!r}; "
                    "each data owner keeps its own ledger file"
                )
            if not stored:
                con.executemany(
                    "INSERT INTO meta VALUES (?, ?)", [("format", FORMAT), ("version", VERSION), ("owner", owner or "")]
                )
            self.owner = stored.get("owner", owner or "")

    def __getstate__(self) -> dict:
        return {"path": self.path, "owner": self.owner}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _connection=None, _pid=0, _lock=threading.Lock())

    def close(self) -> None:
        with self._lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None

    def _connect(self) -> sqlite3.Connection:
        if self._connection is None or self._pid != os.getpid():
            try:
                con = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
                con.execute(
                    "PRAGMA journal_mode=WAL"
                )  # stays in rollback mode where WAL is unsupported: slower, still safe
                con.execute("PRAGMA synchronous=FULL")
            except sqlite3.DatabaseError as err:
                raise PrivtuneError(
                    f"privacy ledger {self.path} is unreadable ({err}); it is not a ledger or it is "
                    "corrupt: restore it from a backup (deleting it would reset the spending)"
                ) from None
            except sqlite3.Error as err:
                raise PrivtuneError(f"cannot open privacy ledger {self.path}: {err}") from None
            self._connection, self._pid = con, os.getpid()
        return self._connection

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """An IMMEDIATE transaction: it holds SQLite's write lock from the first read, so read-compare-insert "
        "is atomic."""
        with self._lock:
            con = self._connect()
            try:
                con.execute("BEGIN IMMEDIATE")
                yield con
                con.execute("COMMIT")
            except sqlite3.DatabaseError as err:
                if con.in_transaction:
                    con.execute("ROLLBACK")
                raise PrivtuneError(
                    f"privacy ledger {self.path} is unreadable ({err}); it is not a ledger or it is "
                    "corrupt: restore it from a backup (deleting it would reset the spending)"
                ) from None
            except BaseException:
                if con.in_transaction:
                    con.execute("ROLLBACK")
                raise

    # ------------------------------------------------------------------ budgets
    def set_budget(self, kind: str, epsilon: float, *, delta: float = 0.0, alpha: float | None = None) -> Budget:
        budget = Budget(kind, float(epsilon), float(delta), None if alpha is None else float(alpha))
        with self._transaction() as con:
            used_alpha = _alpha_in_use(con, kind)
            if used_alpha is not None and budget.alpha != used_alpha:
                raise PrivtuneError(
                    f"ledger {self.path} already holds PMixED spending at order {used_alpha:g}; "
                    f"a budget at order {budget.alpha:g} cannot count it"
                )
            con.execute(
                "INSERT OR REPLACE INTO budgets VALUES (?, ?, ?, ?)", (kind, budget.epsilon, budget.delta, budget.alpha)
            )
        return budget

    def budget(self, kind: str) -> Budget | None:
        with self._transaction() as con:
            return _budget(con, _kind(kind).name)

    # ------------------------------------------------------------------ spending
    def spend(
        self,
        kind: str,
        amount: float,
        *,
        subject: str = "",
        alpha: float | None = None,
        details: dict | None = None,
        dry_run: bool = False,
    ) -> Record:
        """Add ``amount`` (epsilon, or RDP at ``alpha`` for PMixED) to ``subject``'s total, or refuse.

        Raises :class:`BudgetExceededError` (recording nothing) if the total would exceed the budget.
        ``dry_run`` checks without recording. Returns the record (id 0 for a dry run).
        """
        spec = _kind(kind)
        if spec.cumulative:
            raise PrivtuneError(f"{spec.title} spending is cumulative: use set_cumulative, not spend")
        _check_amount(amount, spec)
        if kind == "pmixed" and alpha is None:
            raise PrivtuneError("PMixED spending is RDP at an order: pass alpha")
        with self._transaction() as con:
            used_alpha = _alpha_in_use(con, kind)
            if alpha is not None and used_alpha is not None and alpha != used_alpha:
                raise PrivtuneError(
                    f"ledger {self.path} counts PMixED RDP at order {used_alpha:g}; "
                    f"RDP at order {alpha:g} cannot be added to it"
                )
            previous = _last_total(con, kind, subject)
            return self._commit(con, spec, subject, amount, previous + amount, 0.0, alpha, details, dry_run)

    def set_cumulative(
        self,
        kind: str,
        total: float | Callable[[list[Record]], float],
        *,
        delta: float,
        subject: str = "",
        details: dict | None = None,
        dry_run: bool = False,
    ) -> Record:
        """Set ``subject``'s cumulative spending to ``total`` (at ``delta``), or refuse.

        ``total`` may be a function of the subject's existing records of this kind; it is evaluated
        inside the transaction, so two processes composing onto the same history cannot both use a
        stale one (DP-SGD rebuilds its accountant from the records this way). It must not call the ledger.
        """
        spec = _kind(kind)
        if not spec.cumulative:
            raise PrivtuneError(f"{spec.title} spending adds up: use spend, not set_cumulative")
        with self._transaction() as con:
            new_total = float(total(_records(con, kind, subject)) if callable(total) else total)
            _check_amount(new_total, spec)
            previous = _last_total(con, kind, subject)
            if new_total < previous * (1 - RELATIVE_TOLERANCE):
                raise PrivtuneError(
                    f"{spec.title}: cumulative epsilon cannot decrease (ledger {self.path} holds "
                    f"{previous:.6g}, got {new_total:.6g}); was the accountant's history lost?"
                )
            budget = _budget(con, kind)
            if budget is not None and delta > budget.delta:
                raise PrivtuneError(
                    f"{spec.title}: delta {delta:g} is larger than the budget's delta {budget.delta:g} "
                    f"(ledger {self.path}); compute epsilon at delta <= {budget.delta:g}"
                )
            return self._commit(
                con, spec, subject, max(new_total - previous, 0.0), new_total, delta, None, details, dry_run
            )

    def _commit(
        self,
        con: sqlite3.Connection,
        spec: Kind,
        subject: str,
        amount: float,
        new_total: float,
        delta: float,
        alpha: float | None,
        details: dict | None,
        dry_run: bool,
    ) -> Record:
        budget = _budget(con, spec.name)
        if budget is not None:
            if spec.name == "pmixed" and alpha != budget.alpha:
                raise PrivtuneError(
                    f"PMixED budget of ledger {self.path} is at order {budget.alpha:g}, "
                    f"the release is RDP at order {alpha:g}"
                )
            if new_total > budget.cap * (1 + RELATIVE_TOLERANCE):
                raise BudgetExceededError(self._refusal(spec, budget, subject, amount, new_total - amount))
        record = Record(
            0,
            time.time(),
            spec.name,
            subject,
            float(amount),
            float(new_total),
            float(delta),
            alpha,
            dict(details or {}),
        )
        if dry_run:
            return record
        cursor = con.execute(
            "INSERT INTO records (time, kind, subject, amount, total, delta, alpha, details) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                record.time,
                record.kind,
                subject,
                record.amount,
                record.total,
                record.delta,
                alpha,
                json.dumps(record.details, sort_keys=True),
            ),
        )
        return Record(**{**asdict(record), "id": int(cursor.lastrowid)})

    def _refusal(self, spec: Kind, budget: Budget, subject: str, amount: float, spent: float) -> str:
        left = max(budget.cap - spent, 0.0)
        whose = f"owner {self.owner!r}" if self.owner else "no owner"
        about = f", {spec.unit} {subject!r}" if subject else ""
        flags = f"--epsilon E --delta {budget.delta:g}" + (f" --alpha {budget.alpha:g}" if budget.alpha else "")
        currency = spec.currency.replace("order alpha", f"order {budget.alpha:g}") if budget.alpha else spec.currency
        return (
            f"{spec.title} refused by ledger {self.path} ({whose}{about}): it needs {amount:.6g} {currency}, "
            f"{spent:.6g} of the budget {budget.cap:.6g} ({budget.describe()}) is spent and {left:.6g} is left. "
            f"Nothing was recorded or released. To allow it, raise the budget with "
            f"'privtune ledger budget {self.path} {spec.name} {flags if spec.name != 'ldp' else '--epsilon E'}' "
            f"(or Ledger.set_budget), or release less."
        )

    # ------------------------------------------------------------------ reading
    def records(self, kind: str | None = None, subject: str | None = None) -> list[Record]:
        with self._transaction() as con:
            return _records(con, kind, subject)

    def total(self, kind: str, subject: str = "") -> float:
        with self._transaction() as con:
            return _last_total(con, _kind(kind).name, subject)

    def remaining(self, kind: str, subject: str = "") -> float | None:
        """What is left of ``subject``'s budget for ``kind`` in its currency; None when no budget is set."""
        with self._transaction() as con:
            budget = _budget(con, _kind(kind).name)
            return None if budget is None else max(budget.cap - _last_total(con, kind, subject), 0.0)

    def report(self) -> dict:
        """Every guarantee the ledger holds, with its unit, as a JSON-ready dict (``privacy.json``)."""
        with self._transaction() as con:
            records = _records(con, None, None)
            budgets = {k: _budget(con, k) for k in KINDS}
        guarantees = []
        for spec in KINDS.values():
            mine = [r for r in records if r.kind == spec.name]
            if mine or budgets[spec.name] is not None:
                guarantees.append(_summarise(spec, mine, budgets[spec.name]))
        return {"ledger": str(self.path), "owner": self.owner, "guarantees": guarantees}

    def render(self) -> str:
        """The report as a text table followed by one sentence per guarantee."""
        report = self.report()
        header = ["kind", "unit", "releases", "spent", "budget", "left"]
        rows = [
            [g["kind"], g["unit"], str(g["releases"]), g["spent_text"], g["budget_text"], g["left_text"]]
            for g in report["guarantees"]
        ]
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
        lines = [
            f"privacy ledger {report['ledger']} (owner {report['owner'] or '-'})",
            "  ".join(h.ljust(w) for h, w in zip(header, widths)),
            "  ".join("-" * w for w in widths),
        ]
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
        if not rows:
            lines.append("(no releases, no budgets)")
        lines += ["", "guarantees:"] + [f"  {g['kind']}: {g['statement']}" for g in report["guarantees"]]
        return "\n".join(lines)


# ---------------------------------------------------------------------- SQL helpers (inside a transaction)
def _budget(con: sqlite3.Connection, kind: str) -> Budget | None:
    row = con.execute("SELECT epsilon, delta, alpha FROM budgets WHERE kind = ?", (kind,)).fetchone()
    return None if row is None else Budget(kind, row[0], row[1], row[2])


def _last_total(con: sqlite3.Connection, kind: str, subject: str) -> float:
    row = con.execute(
        "SELECT total FROM records WHERE kind = ? AND subject = ? ORDER BY id DESC LIMIT 1", (kind, subject)
    ).fetchone()
    return 0.0 if row is None else float(row[0])


def _alpha_in_use(con: sqlite3.Connection, kind: str) -> float | None:
    row = con.execute("SELECT alpha FROM records WHERE kind = ? AND alpha IS NOT NULL LIMIT 1", (kind,)).fetchone()
    return None if row is None else float(row[0])


def _records(con: sqlite3.Connection, kind: str | None, subject: str | None) -> list[Record]:
    query, args = "SELECT id, time, kind, subject, amount, total, delta, alpha, details FROM records", []
    conditions = []
    if kind is not None:
        conditions.append("kind = ?")
        args.append(kind)
    if subject is not None:
        conditions.append("subject = ?")
        args.append(subject)
    if conditions:
        query += " WHERE " + " AND ".join(conditions)
    rows = con.execute(query + " ORDER BY id", args).fetchall()
    return [Record(*row[:8], details=json.loads(row[8])) for row in rows]


def _check_amount(amount: float, spec: Kind) -> None:
    if not (amount >= 0 and math.isfinite(amount)):
        raise PrivtuneError(f"{spec.title}: a privacy cost must be a finite number >= 0, got {amount}")


# ---------------------------------------------------------------------- report
def _summarise(spec: Kind, records: list[Record], budget: Budget | None) -> dict:
    """One guarantee: the worst subject's total, stated in the kind's unit."""
    totals: dict[str, float] = {}
    for record in records:
        totals[record.subject] = record.total
    worst = max(totals.values(), default=0.0)
    entry: dict = {
        "kind": spec.name,
        "title": spec.title,
        "unit": spec.unit,
        "currency": spec.currency,
        "releases": len(records),
        "subjects": len(totals),
        "spent": worst,
        "budget": None if budget is None else asdict(budget),
        "left": None if budget is None else max(budget.cap - worst, 0.0),
    }
    entry["budget_text"] = "none" if budget is None else budget.describe()
    entry["left_text"] = "-" if budget is None else f"{entry['left']:.4g}"
    if spec.name == "ldp":
        token = max((r.details.get("token_epsilon", 0.0) for r in records), default=0.0)
        entry.update(max_document_epsilon=worst, max_token_epsilon=token, unit_token="token")
        entry["spent_text"] = f"eps {worst:.4g} (worst document)"
        entry["statement"] = (
            f"{len(totals)} document(s) released; each is at most {worst:.6g}-LDP (pure; the sum over "
            f"its tokens and releases), each token at most {token:.6g}-LDP within its mechanism's "
            "scope; unit: one document (a token for the per-token figure)"
        )
    elif spec.name == "dpsgd":
        delta = records[-1].delta if records else (budget.delta if budget else 0.0)
        steps = sum(int(r.details.get("steps", 0)) for r in records)
        entry.update(epsilon=worst, delta=delta, steps=steps, rounds=len(records))
        entry["spent_text"] = f"eps {worst:.4g} at delta {delta:g}"
        entry["statement"] = (
            f"({worst:.6g}, {delta:g})-DP for each training example of this owner's data, from the "
            f"RDP accountant over all {steps} DP-SGD steps in {len(records)} round(s); unit: one "
            "training example (one token block)"
        )
    else:
        alpha = records[0].alpha if records else budget.alpha
        queries = sum(int(r.details.get("queries", 1)) for r in records)
        entry.update(rdp=worst, alpha=alpha, queries=queries, epsilon=None, delta=None)
        entry["spent_text"] = f"rdp {worst:.4g} at alpha {alpha:g}"
        as_dp = "no (epsilon, delta) conversion without a budget's delta"
        if budget is not None:
            epsilon = rdp_to_epsilon(worst, budget.delta, alpha) if worst > 0 else 0.0
            entry.update(epsilon=epsilon, delta=budget.delta)
            as_dp = f"({epsilon:.6g}, {budget.delta:g})-DP"
        entry["statement"] = (
            f"{as_dp} for each ensemble member's data shard, from total RDP {worst:.6g} at order "
            f"{alpha:g} over {queries} answered queries; unit: one ensemble member's shard "
            "(a data owner's partition)"
        )
    return entry
