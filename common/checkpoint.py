"""Resumable training state for the long loops (emulator distillation, ULT pretraining).

A checkpoint is a folder of step folders. Each save writes ``.tmp-<step>/`` completely, then renames
it to ``step-<step>/`` (one atomic rename) and only then removes older steps, so a crash at any
moment leaves at least one complete step behind. Each step holds ``meta.json`` (format, step and
the fingerprint of the run's settings: a resume with other settings is refused, not silently mixed)
and ``state.pt`` (tensors and optimizer state, read back with ``weights_only=True``).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from privtune.common.errors import PrivtuneError

META_FILE = "meta.json"
STATE_FILE = "state.pt"
STEP_PREFIX = "step-"


@dataclass(frozen=True)
class Checkpoint:
    step: int
    state: dict[str, Any]


def _steps(path: Path) -> list[tuple[int, Path]]:
    found = []
    for child in path.glob(f"{STEP_PREFIX}*"):
        suffix = child.name.removeprefix(STEP_PREFIX)
        if suffix.isdigit() and (child / META_FILE).exists():
            found.append((int(suffix), child))
    return sorted(found)


def save_checkpoint(path: Path | str, fmt: str, step: int, fingerprint: dict[str, Any], state: dict[str, Any]) -> Path:
    """Write ``state`` as step ``step`` of the checkpoint at ``path``; returns the step folder."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise PrivtuneError(f"checkpoint {path} is a file, not a checkpoint folder; delete it to start over")
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / f".tmp-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    torch.save(state, tmp / STATE_FILE)
    meta = {"format": fmt, "step": step, "fingerprint": fingerprint}
    (tmp / META_FILE).write_text(json.dumps(meta, sort_keys=True) + "\n")
    target = path / f"{STEP_PREFIX}{step:09d}"
    shutil.rmtree(target, ignore_errors=True)
    os.rename(tmp, target)
    for older, folder in _steps(path):
        if older != step:
            shutil.rmtree(folder, ignore_errors=True)
    return target


def load_checkpoint(
    path: Path | str, fmt: str, fingerprint: dict[str, Any], what: str, varies: str = "model, data or settings"
) -> Checkpoint | None:
    """The latest complete step at ``path``, or None when there is none.

    ``what`` names the loop in error messages ("distillation"), ``varies`` what its fingerprint covers.
    """
    path = Path(path)
    if not path.exists():
        return None
    if not path.is_dir():
        raise PrivtuneError(f"{what} checkpoint {path} is not a checkpoint folder; delete it to start over")
    steps = _steps(path)
    if not steps:
        return None
    folder = steps[-1][1]
    try:
        meta = json.loads((folder / META_FILE).read_text())
        state = torch.load(folder / STATE_FILE, weights_only=True)
    except Exception as err:  # json and torch raise several unrelated types for a damaged file
        raise PrivtuneError(
            f"{what} checkpoint {folder} is unreadable ({type(err).__name__}); delete {path} to start over"
        ) from None
    # JSON turns tuples into lists: compare the fingerprint as it reads back
    if meta.get("format") != fmt or meta.get("fingerprint") != json.loads(json.dumps(fingerprint)):
        raise PrivtuneError(
            f"{what} checkpoint {path} was made for another {varies}; "
            "delete it to start over, or rerun with the original settings"
        )
    return Checkpoint(step=int(meta["step"]), state=state)


def remove_checkpoint(path: Path | str) -> None:
    shutil.rmtree(Path(path), ignore_errors=True)
