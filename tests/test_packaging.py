"""The wheel installs one top-level package, ``privtune``, with every layer inside it.

Generic names (``common``, ``server``, ``client``) in site-packages would merge with or overwrite
other distributions' packages, and a user's own ``server.py`` would shadow them.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    build = out / "build"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(REPO)],
        check=True,
        cwd=out,
        env={"PATH": "/usr/bin:/bin", "TMPDIR": str(build.parent)},
    )
    (path,) = out.glob("privtune-*.whl")
    return zipfile.ZipFile(path)


def test_the_only_top_level_package_is_privtune(wheel):
    tops = {name.split("/")[0] for name in wheel.namelist() if not name.split("/")[0].endswith(".dist-info")}
    assert tops == {"privtune"}
    top_level = next(n for n in wheel.namelist() if n.endswith(".dist-info/top_level.txt"))
    assert wheel.read(top_level).decode().split() == ["privtune"]


def test_every_layer_and_the_stubs_are_inside(wheel):
    names = set(wheel.namelist())
    for module in (
        "privtune/__init__.py",
        "privtune/cli.py",
        "privtune/simulate.py",
        "privtune/server/app.py",
        "privtune/client/app.py",
        "privtune/common/ledger/__init__.py",
        "privtune/common/proto_gen/privtune/v1/inference_pb2.py",
        "privtune/common/proto_gen/privtune/v1/inference_pb2_grpc.py",
    ):
        assert module in names, module
    source_packages = {
        p.parent for layer in ("server", "client", "common") for p in (REPO / layer).rglob("__init__.py")
    }
    for package in source_packages:
        assert f"privtune/{package.relative_to(REPO).as_posix()}/__init__.py" in names, package


def test_console_script_and_flower_components_point_into_the_wheel(wheel):
    entry_points = next(n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt"))
    assert "privtune = privtune.cli:main" in wheel.read(entry_points).decode()
    components = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["components"]
    for reference in components.values():
        module = reference.split(":")[0].replace(".", "/") + ".py"
        assert module in set(wheel.namelist()), reference
