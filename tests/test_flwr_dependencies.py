"""``flwr run .``: what Flower's SuperLink would install for the app, inspected without network."""

from __future__ import annotations

import inspect
import io
import re
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def fab_pyproject() -> dict:
    """The pyproject.toml inside the app bundle (FAB) that Flower builds from this repository."""
    from flwr.cli.build import build_fab_from_files

    fab, _ = build_fab_from_files({"pyproject.toml": ROOT / "pyproject.toml"})
    return tomllib.loads(zipfile.ZipFile(io.BytesIO(fab)).read("pyproject.toml").decode())


def test_flowers_runtime_installation_syncs_with_uv_in_the_app_folder():
    """The tables below take effect only because Flower installs with ``uv sync`` in the app's folder."""
    from flwr.supercore.superexec.dependency_installer import install_app_dependencies

    source = inspect.getsource(install_app_dependencies)
    assert '"uv",\n        "sync"' in source and "cwd=project_dir" in source


def test_the_app_bundle_takes_torch_from_the_cpu_index():
    config = fab_pyproject()
    torch_pins = [d for d in config["project"]["dependencies"] if re.split(r"[\s\[<>=!~;@]", d)[0] == "torch"]
    assert torch_pins == ["torch==2.13.0"]  # 2.13.0+cpu satisfies it (a local version label)
    uv = config["tool"]["uv"]
    assert list(uv["sources"]) == ["torch"]
    (source,) = uv["sources"]["torch"]
    index = {i["name"]: i for i in uv["index"]}[source["index"]]
    assert index["url"].endswith("/whl/cpu") and index["explicit"] is True  # nothing else comes from it
    assert source["marker"] == "sys_platform != 'darwin'"  # PyPI's macOS wheels are CPU builds already
