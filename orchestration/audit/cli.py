"""``privtune audit``: attack a finished run (and optionally its PMixED service) and report."""

from __future__ import annotations

import argparse
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, type=Path, help="a finished 'privtune simulate --canaries K' folder")
    parser.add_argument("--out", required=True, type=Path, help="audit folder (audit.json, report.md, roc.png)")
    parser.add_argument("--owner", help="the audited owner (default: the one the harness planted secrets in)")
    parser.add_argument("--canaries", type=int, help="score only the first K planted canaries (default: all)")
    parser.add_argument("--secrets", type=Path, help="audit secrets file (default RUN/audit-secrets.json)")
    parser.add_argument("--key-file", type=Path, help="ULT runs: the federation key (default RUN/federation/...)")
    service = parser.add_argument_group("PMixED service (its queries are spent from the service's budget)")
    service.add_argument("--address", help="host:port of a running 'privtune serve' for this run's members")
    service.add_argument("--tls-ca", type=Path, help="CA certificate of a TLS service")


def run(args: argparse.Namespace) -> int:
    from privtune.audit.measure import audit_run, audit_service
    from privtune.audit.report import write_report

    result = audit_run(args.run, args.owner, args.canaries, args.key_file, args.secrets)
    if args.address:
        tls_ca = args.tls_ca.read_bytes() if args.tls_ca else None
        audit_service(result, args.run, args.address, args.key_file, args.secrets, tls_ca)
    report = write_report(result, args.out)
    print(report.read_text().split("\n\n**")[0].split("![ROC")[0])
    print(f"report: {report}")
    for violation in result.violations:
        print(f"privtune audit: GUARANTEE REFUTED: {violation}")
    return 1 if result.violations else 0
