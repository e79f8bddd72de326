"""``privtune ledger``: show a privacy ledger, set one of its budgets, back it up, or reset it deliberately."""

from __future__ import annotations

import argparse
import json
import math
from contextlib import suppress
from pathlib import Path

from privtune.common.errors import PrivtuneError
from privtune.common.ledger import KINDS, Ledger
from privtune.common.ledger.marker import reset
from privtune.common.ledger.registry import default_registry, forget
from privtune.common.ledger.render import render

BACKUPS = (
    "Back a ledger up with 'privtune ledger backup PATH DEST' (a consistent snapshot, safe while services "
    "spend): while a ledger is open its newest releases may be in PATH-wal, so a copy of PATH alone can miss them."
)


def _number(text: str) -> float:
    """A float that is finite: inf and nan would turn a budget into no budget."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def configure(parser: argparse.ArgumentParser) -> None:
    parser.epilog = BACKUPS
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    show = actions.add_parser("show", help="print the guarantees recorded in a ledger (never writes to it)")
    show.add_argument("path", metavar="PATH", help="ledger file")
    show.add_argument("--json", action="store_true", help="print the report as JSON (the privacy.json format)")
    budget = actions.add_parser("budget", help="set (raise or lower) the budget of one kind of release")
    budget.add_argument("path", metavar="PATH", help="ledger file (created if missing)")
    budget.add_argument(
        "kind", choices=sorted(KINDS), help="ldp: per document; dpsgd: (eps, delta); pmixed: RDP at alpha"
    )
    budget.add_argument("--epsilon", type=_number, required=True)
    budget.add_argument("--delta", type=_number, default=0.0, help="dpsgd and pmixed only")
    budget.add_argument("--alpha", type=_number, default=None, help="pmixed only: the RDP order")
    budget.add_argument("--owner", default=None, help="owner name recorded in a new ledger")
    backup = actions.add_parser("backup", help="copy a consistent snapshot of a ledger", description=BACKUPS)
    backup.add_argument("path", metavar="PATH", help="ledger file")
    backup.add_argument("destination", metavar="DEST", help="new file for the copy")
    start_over = actions.add_parser(
        "reset",
        help="start a ledger over from zero spent (the old file is kept aside; logged in PATH.resets.log)",
    )
    start_over.add_argument("path", metavar="PATH", help="ledger file")
    start_over.add_argument("--reason", required=True, help="why the spending may start over (logged)")


def run(args: argparse.Namespace) -> int:
    if args.action == "show":
        ledger = Ledger(args.path, create=False, read_only=True)
        print(json.dumps(ledger.report(), indent=2) if args.json else render(ledger.report()))
        return 0
    if args.action == "backup":
        with Ledger(args.path, create=False) as ledger:
            print(f"{args.path}: backed up to {ledger.backup(args.destination)}")
        return 0
    if args.action == "reset":
        return _reset(Path(args.path), args.reason)
    with Ledger(args.path, owner=args.owner) as ledger:
        budget = ledger.set_budget(args.kind, args.epsilon, delta=args.delta, alpha=args.alpha)
    print(f"{args.path}: {KINDS[args.kind].title} budget set to {budget.describe()}")
    return 0


def _reset(path: Path, reason: str) -> int:
    ledger_id = None
    if path.exists() and path.stat().st_size:
        with suppress(PrivtuneError):  # a damaged or replaced file: the marker names the ledger that was there
            ledger_id = Ledger(path, read_only=True).ledger_id
    moved, marker = reset(path, reason)
    ids = {i for i in (ledger_id, marker.ledger_id if marker else None) if i}
    released = forget(default_registry(), path, ids)
    print(
        f"{path}: reset ({reason}); old ledger kept as {moved or '(none: it was missing)'}; "
        f"{released} served artefact(s) released from it"
    )
    return 0
