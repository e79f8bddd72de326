"""``privtune ldp perturb``: perturb a text file token by token and record the release in a ledger."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from privtune.common.errors import PrivtuneError
from privtune.common.ldp.perturb import MECHANISMS, LdpConfig, build_mechanism, perturb_file


def configure(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    perturb = actions.add_parser("perturb", help="write a locally differentially private version of a text file")
    perturb.add_argument("input", metavar="IN", type=Path, help="UTF-8 text file; the whole file is one document")
    perturb.add_argument("-o", "--output", type=Path, required=True, help="where to write the perturbed text")
    perturb.add_argument(
        "--epsilon",
        type=float,
        required=True,
        help="mechanism parameter: per unit of embedding distance (santext) or per token within a cell (custext)",
    )
    perturb.add_argument(
        "--embedding",
        default="smollm2",
        help="smollm2 (default), tiny, tiny-gpt2/tiny-llama/tiny-opt, or a Hugging Face model folder",
    )
    perturb.add_argument("--mechanism", choices=MECHANISMS, default="santext")
    perturb.add_argument("--top-k", type=int, default=20, help="custext: cell size k (cells hold k to 2k-1 tokens)")
    perturb.add_argument("--memory-cap-mb", type=float, default=256.0, help="working memory of one sampling chunk")
    perturb.add_argument(
        "--ledger", type=Path, default=None, help="privacy ledger that records (and budgets) the release"
    )
    perturb.add_argument(
        "--document-id",
        default=None,
        help="ledger subject; releases with the same id add up (default: sha256:<hash of the file's content>, "
        "so a renamed or copied document keeps its budget)",
    )
    perturb.add_argument("--seed", type=int, default=None, help="fixed seed: reproducible but NOT private; tests only")


def run(args: argparse.Namespace) -> int:
    from privtune.common.ledger import Ledger

    if not args.input.is_file():
        raise PrivtuneError(f"cannot read {args.input}: not a file")
    if args.seed is not None:
        print("privtune ldp: warning: --seed makes the noise predictable; the output is not private", file=sys.stderr)
    config = LdpConfig(
        epsilon=args.epsilon,
        mechanism=args.mechanism,
        embedding=args.embedding,
        top_k=args.top_k,
        memory_cap_mb=args.memory_cap_mb,
    )
    mechanism = build_mechanism(config)
    ledger = Ledger(args.ledger) if args.ledger is not None else None
    release, subject = perturb_file(
        args.input, args.output, mechanism, seed=args.seed, ledger=ledger, document_id=args.document_id
    )
    print(f"perturbed {release.n_tokens} tokens of {args.input} -> {args.output}")
    print(release.describe())
    if ledger is not None:
        record = ledger.records("ldp", subject)[-1]
        print(f"ledger {ledger.path}: record #{record.id}, document {subject!r} now at {record.total:.6g}-LDP in total")
    return 0
