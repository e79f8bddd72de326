"""A ledger's report as text: the table ``privtune ledger show`` prints."""

from __future__ import annotations


def render(report: dict) -> str:
    """The report as a text table (one row per kind and scope) followed by one sentence per guarantee."""
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
    lines += ["", "guarantees (each row its own promise; rows are never added together):"]
    lines += [f"  {g['kind']} [{g['scope']}]: {g['statement']}" for g in report["guarantees"]]
    if report.get("pays_for"):
        lines += ["", "pays for (no other ledger may release from these; content hash, last served from):"]
        lines += [f"  sha256 {digest[:16]}  {name}" for digest, name in sorted(report["pays_for"].items())]
    return "\n".join(lines)
