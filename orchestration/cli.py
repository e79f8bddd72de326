"""The ``privtune`` command: one entry point, subcommands implemented next to what they drive.

Each subcommand lives in its own module, which exposes ``configure(parser)`` (adds arguments) and
``run(args) -> int``. Modules are imported only when their subcommand is chosen, so ``privtune
--help`` and light commands stay fast and do not pull in torch or Ray.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass

from privtune.common.errors import PrivtuneError


@dataclass(frozen=True)
class Command:
    name: str
    module: str
    summary: str


COMMANDS: tuple[Command, ...] = (
    Command("demo", "privtune.demo", "run the whole pipeline on the embedded defaults"),
    Command("prepare", "privtune.server.prepare", "model owner: build (and distil) an emulator package"),
    Command("evaluate", "privtune.server.evaluate", "perplexity table: zero-shot / emulator / plug-in / full FT"),
    Command("export", "privtune.server.export", "a run's result as a merged model or a peft adapter folder"),
    Command("simulate", "privtune.simulate", "run a simulated federation (Flower Simulation Engine)"),
    Command("serve", "privtune.server.inference.cli", "start the PMixED private next-token service on Ray"),
    Command("audit", "privtune.audit.cli", "attack a finished run: canaries, membership inference, DP limits"),
    Command("query", "privtune.client.query", "query the private next-token service over gRPC"),
    Command("ult", "privtune.common.ult_cli", "build ULT tables, encode and decode files"),
    Command("ldp", "privtune.common.ldp.cli", "locally perturb text with the exponential mechanism"),
    Command("ledger", "privtune.common.ledger_cli", "show a privacy ledger as a report"),
    Command("models", "privtune.common.models_cli", "load/convert a model source and show what it is"),
)


def build_parser(command: Command | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="privtune",
        description="Federated, privacy-preserving fine-tuning and private inference for language models.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n"
        + "\n".join(f"  {c.name:<10} {c.summary}" for c in COMMANDS)
        + "\n\nRun 'privtune COMMAND --help' for a command's options.",
    )
    parser.add_argument("command", choices=[c.name for c in COMMANDS], metavar="COMMAND")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    by_name = {c.name: c for c in COMMANDS}
    if not argv or argv[0] not in by_name:
        build_parser().parse_args(argv[:1] or ["--help"])
        return 2
    command = by_name[argv[0]]
    module = importlib.import_module(command.module)
    parser = argparse.ArgumentParser(prog=f"privtune {command.name}", description=command.summary)
    module.configure(parser)
    args = parser.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except PrivtuneError as err:
        print(f"privtune {command.name}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
