"""The sidecar that remembers a ledger existed: ``LEDGER.marker.json``.

A ledger is the only memory of what was already released; deleting it, truncating it to zero bytes,
or putting another (or an older) ledger in its place would silently reset the spending to zero.
The marker next to it records the ledger's identity and how many releases it held when last seen
(at each open, budget change and close, and at most a second behind while releases are recorded),
so that opening refuses a ledger that is missing, empty, foreign or rolled back while the marker
says otherwise. Starting again from zero is then an explicit act, ``privtune ledger reset``,
appended to ``LEDGER.resets.log``.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from privtune.common.errors import PrivtuneError

FORMAT = "privtune-ledger-marker"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Marker:
    ledger_id: str
    owner: str
    releases: int  # the highest record id the ledger held; it never decreases


def marker_path(ledger: Path) -> Path:
    return ledger.with_name(ledger.name + ".marker.json")


def reset_log_path(ledger: Path) -> Path:
    return ledger.with_name(ledger.name + ".resets.log")


def read_marker(ledger: Path) -> Marker | None:
    path = marker_path(ledger)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as err:
        raise PrivtuneError(f"the ledger marker {path} is unreadable ({err}); restore it with its ledger") from None
    if data.get("format") != FORMAT:
        raise PrivtuneError(f"{path} is not a privtune ledger marker")
    return Marker(str(data["ledger_id"]), str(data["owner"]), int(data["releases"]))


def write_marker(ledger: Path, marker: Marker) -> None:
    """Atomically (write, fsync, rename), so a crash leaves the old marker or the new one."""
    path = marker_path(ledger)
    partial = path.with_name(f"{path.name}.{os.getpid()}-{threading.get_ident()}.partial")  # writers never collide
    with open(partial, "w") as handle:
        json.dump({"format": FORMAT, **asdict(marker)}, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)


def reset(ledger: Path, reason: str) -> tuple[Path | None, Marker | None]:
    """Forget that ``ledger`` existed: move the ledger (if any) aside, drop the marker, log it.

    Returns where the old ledger was moved and the marker it had. The old file is kept, never
    deleted: a reset by mistake can be undone by moving it back.
    """
    if not reason.strip():
        raise PrivtuneError("a ledger reset needs a reason (--reason), recorded in the reset log")
    marker = read_marker(ledger)
    moved = None
    if ledger.exists():
        moved = ledger.with_name(f"{ledger.name}.reset-{time.strftime('%Y%m%dT%H%M%S')}")
        os.replace(ledger, moved)
        for suffix in ("-wal", "-shm"):
            side = ledger.with_name(ledger.name + suffix)
            if side.exists():
                os.replace(side, moved.with_name(moved.name + suffix))
    entry = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "reason": reason,
        "marker": None if marker is None else asdict(marker),
        "moved_to": None if moved is None else str(moved),
    }
    ledger.parent.mkdir(parents=True, exist_ok=True)  # a reset log survives the run folder that held the ledger
    with open(reset_log_path(ledger), "a") as handle:
        handle.write(json.dumps(entry) + "\n")
    marker_path(ledger).unlink(missing_ok=True)
    log.warning("privacy ledger %s reset: %s (old ledger kept as %s)", ledger, reason, moved)
    return moved, marker
