"""The ledger's storage: one SQLite file per data owner (LDP, DP-SGD) or inference service (PMixED).

It is a SQLite file so that it persists across restarts and so that several processes (the Ray
replicas of the inference service) can spend from ONE budget: every check-and-spend runs in a
``BEGIN IMMEDIATE`` transaction (read the total, compare with the budget, insert, commit), which
SQLite serialises across processes. A refused release records nothing. What the numbers mean is
:mod:`.kinds`'s business; this module only adds up, compares and remembers.

Backups: the file is in WAL mode, so while it is open the latest releases may sit in
``LEDGER-wal``; a copy of the main file alone can then miss them. :meth:`Ledger.close` checkpoints
the WAL into the main file; ``privtune ledger backup`` copies a consistent snapshot at any time.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from privtune.common.errors import BudgetExceededError, PrivtuneError
from privtune.common.ledger.kinds import KINDS, Budget, Kind, Record, kind_of
from privtune.common.ledger.marker import Marker, marker_path, read_marker, write_marker

FORMAT = "privtune-ledger"
VERSION = "2"
RELATIVE_TOLERANCE = 1e-9  # lets exactly T spends of budget/T fit despite float summation
BUSY_TIMEOUT_S = 60.0
MARKER_INTERVAL_S = 1.0  # how far the marker may lag behind the releases (each marker write is an fsync)
ARTEFACT = "pays-for:"  # meta keys of the artefacts (by content hash) this ledger pays for

SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE budgets (kind TEXT PRIMARY KEY, epsilon REAL NOT NULL, delta REAL NOT NULL, alpha REAL);
CREATE TABLE records (
    id INTEGER PRIMARY KEY AUTOINCREMENT, time REAL NOT NULL, kind TEXT NOT NULL, subject TEXT NOT NULL,
    amount REAL NOT NULL, total REAL NOT NULL, delta REAL NOT NULL, alpha REAL, details TEXT NOT NULL,
    scope TEXT NOT NULL DEFAULT '');
"""
INDEX = "CREATE INDEX records_by_scope ON records (kind, scope, subject, id)"
UNREADABLE = "it is not a ledger or it is corrupt: restore it from a backup (deleting it would reset the spending)"


class Ledger:
    """A privacy ledger file, shared safely by every process and thread that opens it.

    The file is in SQLite's WAL mode with ``synchronous=FULL``: a commit is one durable append
    (~2 ms where an fsync costs that), readers never block the writer, and a crash loses no
    committed spend. WAL needs the processes on one host (not a network file system). Each process
    keeps one connection (reopened after a fork, dropped when pickled to a Ray worker).

    ``read_only`` opens a snapshot in memory and never writes the file or its marker.
    """

    def __init__(
        self, path: str | Path, owner: str | None = None, *, create: bool = True, read_only: bool = False
    ) -> None:
        self.path = Path(path).expanduser()
        self.read_only = read_only
        self._connection: sqlite3.Connection | None = None
        self._pid = 0
        self._lock = threading.Lock()
        self._marker_time = 0.0
        marker = read_marker(self.path)
        if not self.path.exists() or self.path.stat().st_size == 0:
            if marker is not None:
                raise PrivtuneError(self._vanished(marker, "is missing" if not self.path.exists() else "is empty"))
            if not create or read_only:
                raise PrivtuneError(
                    f"no privacy ledger at {self.path}; check the path (ledgers are created by the "
                    "first release or by 'privtune ledger budget')"
                )
            self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._transaction() as con:
            meta = self._open(con, owner)
            releases = _releases(con)
            self._check_marker(marker, meta, releases)
            self.owner, self.ledger_id = meta["owner"], meta["ledger_id"]
            self._write_marker(releases)
        if not read_only:  # persistent in the file; set only once it is known to be a ledger
            self._connect().execute("PRAGMA journal_mode=WAL")  # stays in rollback mode where WAL is unsupported

    def _open(self, con: sqlite3.Connection, owner: str | None) -> dict[str, str]:
        """The ledger's meta data; creates the tables in a new file, refuses a foreign one untouched."""
        tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not tables and not self.read_only:
            _executescript(con, SCHEMA + ";" + INDEX)
            meta = {"format": FORMAT, "version": VERSION, "owner": owner or "", "ledger_id": uuid.uuid4().hex}
            con.executemany("INSERT INTO meta VALUES (?, ?)", list(meta.items()))
            return meta
        meta = dict(con.execute("SELECT key, value FROM meta").fetchall()) if "meta" in tables else {}
        if meta.get("format") != FORMAT:
            raise PrivtuneError(f"{self.path} is not a privtune ledger (a different file is in its place)")
        if meta.get("version") == "1":
            meta = _migrate_v1(con, meta)
        elif meta.get("version") != VERSION:
            raise PrivtuneError(f"ledger {self.path} is format version {meta.get('version')}; update privtune")
        if meta["owner"] and owner is not None and meta["owner"] != owner:
            raise PrivtuneError(
                f"ledger {self.path} belongs to {meta['owner']!r}, not {owner!r}; each data owner keeps its own "
                "ledger file"
            )
        return meta

    def _check_marker(self, marker: Marker | None, meta: dict[str, str], releases: int) -> None:
        if marker is None:
            return
        if marker.ledger_id != meta["ledger_id"]:
            raise PrivtuneError(
                f"{self.path} is another ledger (id {meta['ledger_id']}) than the one its marker "
                f"{marker_path(self.path)} recorded (id {marker.ledger_id}, {marker.releases} releases): the "
                "ledger was replaced. Put the right ledger back, or start over deliberately with "
                f"'privtune ledger reset {self.path} --reason ...'"
            )
        if releases < marker.releases:
            raise PrivtuneError(
                f"ledger {self.path} holds {releases} releases but its marker recorded {marker.releases}: it was "
                "restored from an older copy, which would forget spending. Restore the latest backup, or start "
                f"over deliberately with 'privtune ledger reset {self.path} --reason ...'"
            )

    def _vanished(self, marker: Marker, what: str) -> str:
        return (
            f"privacy ledger {self.path} {what}, but its marker {marker_path(self.path)} says it existed "
            f"(id {marker.ledger_id}, owner {marker.owner or '-'}, {marker.releases} releases). Starting from an "
            "empty ledger would forget what was spent: restore the ledger from a backup ('privtune ledger backup' "
            f"makes them), or start over deliberately with 'privtune ledger reset {self.path} --reason ...' "
            "(logged)"
        )

    def _check_writable(self) -> None:
        if self.read_only:
            raise PrivtuneError(f"ledger {self.path} was opened read-only; open it writable to record anything")

    def _write_marker(self, releases: int) -> None:
        """Call inside a transaction: SQLite's write lock orders the marker writes of all processes."""
        if not self.read_only:
            write_marker(self.path, Marker(self.ledger_id, self.owner, releases))
            self._marker_time = time.monotonic()

    def _note_release(self, record: Record) -> Record:
        """Advance the marker to a committed release, at most once per MARKER_INTERVAL_S.

        Outside the transaction, so a concurrent writer may leave a lower count than the newest:
        a marker behind its ledger is always safe, one ahead of it would refuse a sound ledger.
        """
        if not self.read_only and record.id and time.monotonic() - self._marker_time >= MARKER_INTERVAL_S:
            marker = read_marker(self.path)
            if marker is None or marker.releases < record.id:
                write_marker(self.path, Marker(self.ledger_id, self.owner, record.id))
            self._marker_time = time.monotonic()
        return record

    def __getstate__(self) -> dict:
        return {"path": self.path, "owner": self.owner, "ledger_id": self.ledger_id, "read_only": self.read_only}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _connection=None, _pid=0, _lock=threading.Lock())

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Record the release count in the marker and fold the WAL into the main file (a clean shutdown)."""
        if self._connection is None or self._pid != os.getpid():
            return
        if not self.read_only:
            with self._transaction() as con:
                self._write_marker(_releases(con))
        with self._lock:
            if not self.read_only:
                self._connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._connection.close()
            self._connection = None

    def backup(self, destination: str | Path) -> Path:
        """A consistent copy of the ledger (WAL included) at ``destination``, via SQLite's backup API."""
        target = Path(destination).expanduser()
        if target.exists():
            raise PrivtuneError(f"{target} exists; name a new file for the backup")
        with self._lock:
            copy = sqlite3.connect(target)
            try:
                self._connect().backup(copy)
            finally:
                copy.close()
        return target

    def _connect(self) -> sqlite3.Connection:
        if self._connection is None or self._pid != os.getpid():
            try:
                con = self._read_only_snapshot() if self.read_only else self._writable_connection()
            except sqlite3.DatabaseError as err:
                raise PrivtuneError(f"privacy ledger {self.path} is unreadable ({err}); {UNREADABLE}") from None
            except sqlite3.Error as err:
                raise PrivtuneError(f"cannot open privacy ledger {self.path}: {err}") from None
            self._connection, self._pid = con, os.getpid()
        return self._connection

    def _writable_connection(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
        con.execute("PRAGMA synchronous=FULL")
        return con

    def _read_only_snapshot(self) -> sqlite3.Connection:
        source = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_S)
        snapshot = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
        try:
            source.backup(snapshot)
        finally:
            source.close()
        return snapshot

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """An IMMEDIATE transaction: it holds SQLite's write lock from the first read, so read-compare-insert
        is atomic."""
        with self._lock:
            con = self._connect()
            try:
                con.execute("BEGIN IMMEDIATE")
                yield con
                con.execute("COMMIT")
            except sqlite3.DatabaseError as err:
                if con.in_transaction:
                    con.execute("ROLLBACK")
                raise PrivtuneError(f"privacy ledger {self.path} is unreadable ({err}); {UNREADABLE}") from None
            except BaseException:
                if con.in_transaction:
                    con.execute("ROLLBACK")
                raise

    # ------------------------------------------------------------------ budgets
    def set_budget(self, kind: str, epsilon: float, *, delta: float = 0.0, alpha: float | None = None) -> Budget:
        budget = Budget(kind, float(epsilon), float(delta), None if alpha is None else float(alpha))
        self._check_writable()
        with self._transaction() as con:
            used_alpha = _alpha_in_use(con, kind)
            if used_alpha is not None and budget.alpha != used_alpha:
                raise PrivtuneError(
                    f"ledger {self.path} already holds {kind_of(kind).title} spending at order {used_alpha:g}; "
                    f"a budget at order {budget.alpha} cannot count it"
                )
            con.execute(
                "INSERT OR REPLACE INTO budgets VALUES (?, ?, ?, ?)", (kind, budget.epsilon, budget.delta, budget.alpha)
            )
            self._write_marker(_releases(con))
        return budget

    def budget(self, kind: str) -> Budget | None:
        with self._transaction() as con:
            return _budget(con, kind_of(kind).name)

    def record_artefacts(self, artefacts: dict[str, str]) -> None:
        """Note the content hashes (-> names) of what this ledger pays for (see :mod:`.registry`)."""
        self._check_writable()
        with self._transaction() as con:
            con.executemany(
                "INSERT OR REPLACE INTO meta VALUES (?, ?)", [(f"{ARTEFACT}{h}", n) for h, n in artefacts.items()]
            )

    def artefacts(self) -> dict[str, str]:
        with self._transaction() as con:
            rows = con.execute("SELECT key, value FROM meta WHERE key LIKE ?", (ARTEFACT + "%",)).fetchall()
        return {key[len(ARTEFACT) :]: name for key, name in rows}

    # ------------------------------------------------------------------ spending
    def spend(
        self,
        kind: str,
        amount: float,
        *,
        subject: str = "",
        scope: str = "",
        alpha: float | None = None,
        details: dict | None = None,
        dry_run: bool = False,
    ) -> Record:
        """Add ``amount`` (epsilon, or RDP at ``alpha`` for PMixED) to ``subject``'s total in its scope, or refuse.

        Raises :class:`BudgetExceededError` (recording nothing) if the total would exceed the budget.
        ``dry_run`` checks without recording. Returns the record (id 0 for a dry run).
        """
        spec = kind_of(kind)
        if spec.cumulative:
            raise PrivtuneError(f"{spec.title} spending is cumulative: use set_cumulative, not spend")
        _check_amount(amount, spec)
        scope = spec.release_scope(scope, details or {})
        with self._transaction() as con:
            used_alpha = _alpha_in_use(con, kind)
            if alpha is not None and used_alpha is not None and alpha != used_alpha:
                raise PrivtuneError(
                    f"ledger {self.path} counts {spec.title} RDP at order {used_alpha:g}; "
                    f"RDP at order {alpha:g} cannot be added to it"
                )
            previous = _last_total(con, kind, scope, subject)
            record = self._commit(con, spec, scope, subject, amount, previous + amount, 0.0, alpha, details, dry_run)
        return self._note_release(record)

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
        spec = kind_of(kind)
        if not spec.cumulative:
            raise PrivtuneError(f"{spec.title} spending adds up: use spend, not set_cumulative")
        scope = spec.release_scope("", details or {})
        with self._transaction() as con:
            new_total = float(total(_records(con, kind, subject)) if callable(total) else total)
            _check_amount(new_total, spec)
            previous = _last_total(con, kind, scope, subject)
            if new_total < previous * (1 - RELATIVE_TOLERANCE):
                raise PrivtuneError(
                    f"{spec.title}: cumulative epsilon cannot decrease (ledger {self.path} holds "
                    f"{previous:.6g}, got {new_total:.6g}); was the accountant's history lost?"
                )
            amount = max(new_total - previous, 0.0)
            record = self._commit(con, spec, scope, subject, amount, new_total, delta, None, details, dry_run)
        return self._note_release(record)

    def _commit(
        self,
        con: sqlite3.Connection,
        spec: Kind,
        scope: str,
        subject: str,
        amount: float,
        new_total: float,
        delta: float,
        alpha: float | None,
        details: dict | None,
        dry_run: bool,
    ) -> Record:
        budget = _budget(con, spec.name)
        spec.check_release(alpha, delta, budget)
        if budget is not None and new_total > budget.cap * (1 + RELATIVE_TOLERANCE):
            raise BudgetExceededError(self._refusal(spec, budget, scope, subject, amount, new_total - amount))
        record = Record(
            0, time.time(), spec.name, scope, subject, float(amount), float(new_total), float(delta), alpha,
            dict(details or {}),
        )  # fmt: skip
        if dry_run:
            return record
        self._check_writable()
        cursor = con.execute(
            "INSERT INTO records (time, kind, scope, subject, amount, total, delta, alpha, details) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                record.time,
                record.kind,
                scope,
                subject,
                record.amount,
                record.total,
                record.delta,
                alpha,
                json.dumps(record.details, sort_keys=True),
            ),
        )
        if cursor.lastrowid is None:
            raise PrivtuneError(f"the ledger {self.path} recorded no row id for a {record.kind} release")
        return Record(**{**asdict(record), "id": cursor.lastrowid})

    def _refusal(self, spec: Kind, budget: Budget, scope: str, subject: str, amount: float, spent: float) -> str:
        left = max(budget.cap - spent, 0.0)
        whose = f"owner {self.owner!r}" if self.owner else "no owner"
        about = f", {spec.unit} {subject!r}" if subject else ""
        currency = spec.currency.replace("order alpha", f"order {budget.alpha:g}") if budget.alpha else spec.currency
        return (
            f"{spec.title} refused by ledger {self.path} ({whose}{about}, scope: {scope}): it needs {amount:.6g} "
            f"{currency}, {spent:.6g} of the budget {budget.cap:.6g} ({budget.describe()}) is spent and {left:.6g} "
            f"is left. Nothing was recorded or released. To allow it, raise the budget with "
            f"'privtune ledger budget {self.path} {spec.name} {spec.budget_flags(budget)}' "
            f"(or Ledger.set_budget), or release less."
        )

    # ------------------------------------------------------------------ reading
    def records(self, kind: str | None = None, subject: str | None = None) -> list[Record]:
        with self._transaction() as con:
            return _records(con, kind, subject)

    def total(self, kind: str, subject: str = "", scope: str = "") -> float:
        spec = kind_of(kind)
        scope = spec.release_scope(scope, {})
        with self._transaction() as con:
            return _last_total(con, spec.name, scope, subject)

    def remaining(self, kind: str, subject: str = "", scope: str = "") -> float | None:
        """What is left of ``subject``'s budget for ``kind`` (in ``scope``) in its currency; None without a budget."""
        spec = kind_of(kind)
        scope = spec.release_scope(scope, {})
        with self._transaction() as con:
            budget = _budget(con, spec.name)
            spent = _last_total(con, spec.name, scope, subject)
            return None if budget is None else max(budget.cap - spent, 0.0)

    def report(self) -> dict[str, Any]:
        """Every guarantee the ledger holds, one per kind and scope, as a JSON-ready dict (``privacy.json``).

        Guarantees of different kinds or scopes are listed apart and never added together.
        """
        with self._transaction() as con:
            records = _records(con, None, None)
            budgets = {k: _budget(con, k) for k in KINDS}
        guarantees = []
        for spec in KINDS.values():
            mine = [r for r in records if r.kind == spec.name]
            scopes = list(dict.fromkeys(r.scope for r in mine)) or ([spec.scope] if budgets[spec.name] else [])
            for scope in scopes:
                guarantees.append(spec.summarise(scope, [r for r in mine if r.scope == scope], budgets[spec.name]))
        report = {"ledger": str(self.path), "owner": self.owner, "guarantees": guarantees}
        return {**report, "pays_for": self.artefacts()}


# ---------------------------------------------------------------------- SQL helpers (inside a transaction)
def _executescript(con: sqlite3.Connection, script: str) -> None:
    for statement in script.strip().split(";"):
        if statement.strip():
            con.execute(statement)


def _migrate_v1(con: sqlite3.Connection, meta: dict[str, str]) -> dict[str, str]:
    """Give a version 1 ledger (no scopes) its scopes: LDP totals are re-added per (scope, document)."""
    con.execute("ALTER TABLE records ADD COLUMN scope TEXT NOT NULL DEFAULT ''")
    con.execute("DROP INDEX IF EXISTS records_by_subject")
    con.execute(INDEX)
    totals: dict[tuple[str, str], float] = {}
    for row_id, kind, subject, amount, details in con.execute(
        "SELECT id, kind, subject, amount, details FROM records ORDER BY id"
    ).fetchall():
        spec = kind_of(kind)
        scope = spec.legacy_scope(json.loads(details))
        if spec.cumulative:
            con.execute("UPDATE records SET scope = ? WHERE id = ?", (scope, row_id))
            continue
        totals[scope, subject] = totals.get((scope, subject), 0.0) + amount
        con.execute("UPDATE records SET scope = ?, total = ? WHERE id = ?", (scope, totals[scope, subject], row_id))
    meta = {**meta, "version": VERSION, "ledger_id": meta.get("ledger_id") or uuid.uuid4().hex}
    con.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", list(meta.items()))
    return meta


def _releases(con: sqlite3.Connection) -> int:
    return int(con.execute("SELECT COALESCE(MAX(id), 0) FROM records").fetchone()[0])


def _budget(con: sqlite3.Connection, kind: str) -> Budget | None:
    row = con.execute("SELECT epsilon, delta, alpha FROM budgets WHERE kind = ?", (kind,)).fetchone()
    return None if row is None else Budget(kind, row[0], row[1], row[2])


def _last_total(con: sqlite3.Connection, kind: str, scope: str, subject: str) -> float:
    row = con.execute(
        "SELECT total FROM records WHERE kind = ? AND scope = ? AND subject = ? ORDER BY id DESC LIMIT 1",
        (kind, scope, subject),
    ).fetchone()
    return 0.0 if row is None else float(row[0])


def _alpha_in_use(con: sqlite3.Connection, kind: str) -> float | None:
    row = con.execute("SELECT alpha FROM records WHERE kind = ? AND alpha IS NOT NULL LIMIT 1", (kind,)).fetchone()
    return None if row is None else float(row[0])


def _records(con: sqlite3.Connection, kind: str | None, subject: str | None) -> list[Record]:
    query = "SELECT id, time, kind, scope, subject, amount, total, delta, alpha, details FROM records"
    conditions, args = [], []
    if kind is not None:
        conditions.append("kind = ?")
        args.append(kind)
    if subject is not None:
        conditions.append("subject = ?")
        args.append(subject)
    if conditions:
        query += " WHERE " + " AND ".join(conditions)
    rows = con.execute(query + " ORDER BY id", args).fetchall()
    return [
        Record(
            id=row[0], time=row[1], kind=row[2], scope=row[3], subject=row[4], amount=row[5], total=row[6],
            delta=row[7], alpha=row[8], details=json.loads(row[9]),
        )
        for row in rows
    ]  # fmt: skip


def _check_amount(amount: float, spec: Kind) -> None:
    if not (math.isfinite(amount) and amount >= 0):
        raise PrivtuneError(f"{spec.title}: a privacy cost must be a finite number >= 0, got {amount}")
