"""Regenerate the gRPC stubs: ``python -m privtune.common.proto_gen.generate [--out DIR]`` (``make protos``).

The stubs import each other as ``privtune.common.proto_gen...`` (the installed name), so protoc sees
the protos under that virtual root. ``--out`` defaults to ``common/proto_gen/`` in the repository;
tests write to a temporary folder and compare with the committed stubs.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from privtune.common.errors import PrivtuneError

ROOT = Path(__file__).resolve().parents[2]
PROTOS = ("privtune/v1/inference.proto",)
VIRTUAL_ROOT = "privtune/common/proto_gen"
STUBS = ROOT / "common" / "proto_gen"


def generate(out: Path = STUBS) -> list[Path]:
    """Compile every .proto in PROTOS into ``out/privtune/v1/...``; returns the files written."""
    with tempfile.TemporaryDirectory() as tmp:
        compiled = _compile(Path(tmp))
        written = []
        for path in compiled:
            target = Path(out) / path.relative_to(Path(tmp) / VIRTUAL_ROOT)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
            written.append(target)
    return written


def _compile(out: Path) -> list[Path]:
    from grpc_tools import protoc

    proto_root = ROOT / "protos"
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
    parser = argparse.ArgumentParser(
        prog="python -m privtune.common.proto_gen.generate", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--out", type=Path, default=STUBS, help="output folder (default: common/proto_gen/ in the repository)"
    )
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
