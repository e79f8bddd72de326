"""One installed package, ``privtune``, built from the repository's layer folders.

The folders keep short names (``server/``, ``client/``, ``common/``, and ``orchestration/`` for the
top layer: the CLI, simulation and demo), but nothing is installed under those generic names: each
folder becomes a subpackage of ``privtune`` and ``orchestration/`` becomes ``privtune`` itself.
"""

from setuptools import find_packages, setup

LAYERS = {
    "privtune": "orchestration",
    "privtune.server": "server",
    "privtune.client": "client",
    "privtune.common": "common",
}

packages = [f"{name}.{sub}" if sub else name for name, folder in LAYERS.items() for sub in ["", *find_packages(folder)]]

setup(package_dir=LAYERS, packages=packages, package_data={"privtune.common": ["proto_gen/**/*.pyi"]})
