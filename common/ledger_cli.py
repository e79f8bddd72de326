"""``privtune ledger``: show a privacy ledger as a report, or set one of its budgets."""

from __future__ import annotations

import argparse
import json

from privtune.common.ledger import KINDS, Ledger


def configure(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    show = actions.add_parser("show", help="print the guarantees recorded in a ledger")
    show.add_argument("path", metavar="PATH", help="ledger file")
    show.add_argument("--json", action="store_true", help="print the report as JSON (the privacy.json format)")
    budget = actions.add_parser("budget", help="set (raise or lower) the budget of one kind of release")
    budget.add_argument("path", metavar="PATH", help="ledger file (created if missing)")
    budget.add_argument(
        "kind", choices=sorted(KINDS), help="ldp: per document; dpsgd: (eps, delta); pmixed: RDP at alpha"
    )
    budget.add_argument("--epsilon", type=float, required=True)
    budget.add_argument("--delta", type=float, default=0.0, help="dpsgd and pmixed only")
    budget.add_argument("--alpha", type=float, default=None, help="pmixed only: the RDP order")
    budget.add_argument("--owner", default=None, help="owner name recorded in a new ledger")


def run(args: argparse.Namespace) -> int:
    if args.action == "show":
        ledger = Ledger(args.path, create=False)
        print(json.dumps(ledger.report(), indent=2) if args.json else ledger.render())
        return 0
    ledger = Ledger(args.path, owner=args.owner)
    budget = ledger.set_budget(args.kind, args.epsilon, delta=args.delta, alpha=args.alpha)
    print(f"{args.path}: {KINDS[args.kind].title} budget set to {budget.describe()}")
    return 0
