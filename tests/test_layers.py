"""The import direction of the layers, checked on the source (README, "Architecture").

``privtune.server`` and ``privtune.client`` run at parties that do not trust each other and never
import each other; ``privtune.common`` never imports upward; only the top layer (``orchestration/``,
installed as ``privtune`` itself) drives both. Lazy imports inside functions count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOP = "privtune"
LAYER_OF_FOLDER = {"server": "privtune.server", "client": "privtune.client", "common": "privtune.common"}
ALLOWED = {
    "privtune.server": {"privtune.server", "privtune.common"},
    "privtune.client": {"privtune.client", "privtune.common"},
    "privtune.common": {"privtune.common"},
}


def layer_of(module: str) -> str:
    parts = module.split(".")
    if parts[0] != TOP:
        return ""
    if len(parts) > 1 and f"{TOP}.{parts[1]}" in ALLOWED:
        return f"{TOP}.{parts[1]}"
    return TOP


def imported_modules(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def violations(folder: str) -> list[str]:
    layer = LAYER_OF_FOLDER[folder]
    bad = []
    for path in sorted((REPO / folder).rglob("*.py")):
        for line, module in imported_modules(path):
            target = layer_of(module)
            if target and target not in ALLOWED[layer]:
                bad.append(f"{path.relative_to(REPO)}:{line} imports {module}")
            if module.split(".")[0] in LAYER_OF_FOLDER:
                bad.append(f"{path.relative_to(REPO)}:{line} imports {module} (use the installed name privtune.*)")
    return bad


@pytest.mark.parametrize("folder", sorted(LAYER_OF_FOLDER))
def test_layer_imports_only_downward(folder):
    assert violations(folder) == []


def test_the_check_sees_a_forbidden_import(tmp_path):
    offending = tmp_path / "x.py"
    offending.write_text("def f():\n    from privtune.client.query import sample\n")
    assert imported_modules(offending) == [(2, "privtune.client.query")]
    assert layer_of("privtune.client.query") == "privtune.client"
    assert layer_of("privtune.simulate") == TOP
    assert TOP not in ALLOWED["privtune.common"]
