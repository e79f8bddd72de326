"""Write a named SuperLink connection into the Flower configuration file ($FLWR_HOME/config.toml).

Since Flower 1.2x the CLI (``flwr run . NAME``, ``flwr supernode register KEY NAME``, ``flwr ls NAME``)
reads where the SuperLink is and which CA to trust from that file, not from pyproject.toml, and the
CLI has no command that adds an entry. This writes one through Flower's own reader/writer, so the
file stays in the format the installed Flower expects.

    python deploy/flower_connection.py --name privtune --address 127.0.0.1:9092 --root-certificates deploy/certs/ca.crt
"""

from __future__ import annotations

import argparse
from pathlib import Path

from flwr.cli.flower_config import write_superlink_connection
from flwr.cli.typing import SuperLinkConnection
from flwr.supercore.utils import get_flwr_home


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--name", default="privtune", help="connection name used as `flwr run . NAME` (default privtune)"
    )
    parser.add_argument("--address", required=True, help="SuperLink host:port as the model owner's CLI reaches it")
    parser.add_argument(
        "--root-certificates", required=True, type=Path, help="CA certificate that signed the SuperLink's certificate"
    )
    args = parser.parse_args(argv)
    ca = args.root_certificates.expanduser().resolve()
    if not ca.is_file():
        parser.error(f"--root-certificates {ca} is not a file; make it with deploy/certs.sh")
    write_superlink_connection(
        SuperLinkConnection(name=args.name, address=args.address, root_certificates=str(ca), insecure=False)
    )
    print(f"connection '{args.name}' -> {args.address} (CA {ca}) written to {get_flwr_home() / 'config.toml'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
