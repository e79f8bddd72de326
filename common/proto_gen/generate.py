"""Regenerate the gRPC stubs: ``python -m common.proto_gen.generate [--out DIR]`` (``make protos``).

``--out`` defaults to the repository root, where the stubs land in ``common/proto_gen/``; tests
write to a temporary folder and compare with the committed stubs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.errors import PrivtuneError

ROOT = Path(__file__).resolve().parents[2]
PROTOS = ("privtune/v1/inference.proto",)
VIRTUAL_ROOT = "common/proto_gen"


def generate(out: Path = ROOT) -> list[Path]:
    """Compile every .proto in PROTOS into ``out/common/proto_gen/...``; returns the files written."""
    from grpc_tools import protoc

    proto_root = ROOT / "protos"
    out = Path(out)
    args = [
        "grpc_tools.protoc",
        f"-I{VIRTUAL_ROOT}={proto_root}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--pyi_out={out}",
        *(str(proto_root / p) for p in PROTOS),
    ]
    if protoc.main(args) != 0:
        raise PrivtuneError(f"protoc failed on {', '.join(PROTOS)} (arguments: {' '.join(args[1:])})")
    written = []
    for proto in PROTOS:
        stem = out / VIRTUAL_ROOT / Path(proto).with_suffix("")
        written += [stem.with_name(stem.name + suffix) for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")]
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m common.proto_gen.generate", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT, help="output root (default: the repository root)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
