"""Outputs of a simulated run gathered in one folder: metrics.json and privacy.json.

In a real deployment every ledger stays at its owner's site; in a simulation all sites share this
machine, so the report can show each owner's ledger next to the model owner's metrics.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from privtune.common.federation.config import FederationConfig


def write_simulation_outputs(cfg: FederationConfig, out: Path, owners: int) -> dict[str, Any]:
    server_dir = Path(cfg.run_dir)
    metrics = json.loads((server_dir / "metrics.json").read_text())
    shutil.copy(server_dir / "metrics.json", out / "metrics.json")
    privacy = {}
    for i in range(owners):
        ledger_path = out / "owners" / f"owner-{i}" / "ledger.sqlite"
        if ledger_path.exists():
            from privtune.common.ledger import Ledger

            privacy[f"owner-{i}"] = Ledger(ledger_path, read_only=True).report()
        else:
            privacy[f"owner-{i}"] = {"releases": []}
    (out / "privacy.json").write_text(json.dumps(privacy, indent=2, sort_keys=True) + "\n")
    return metrics
