"""Which ledger pays for which private artefact (a PMixED member's adapter), for every ledger of this machine.

The budget of a member's data lives in ONE ledger. Serving the same members from a second ledger (another
``--ledger``, or a default ledger found through another path to the same run) would grant the full
budget again. The registry maps each artefact's content hash to the one ledger bound to it, so a second
ledger is refused whatever path or copy the artefact is served from; the ledger records the hashes it
pays for too. ``privtune ledger reset`` releases the old ledger's artefacts, deliberately and logged.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from privtune.common.errors import PrivtuneError
from privtune.common.ledger.store import Ledger
from privtune.common.paths import cache_dir

REGISTRY_FILE = "bindings.json"


def default_registry() -> Path:
    return cache_dir("ledgers") / REGISTRY_FILE


@contextmanager
def _locked(registry: Path) -> Iterator[dict[str, dict[str, str]]]:
    """The registry's entries under an exclusive lock; what the block leaves in them is written back."""
    registry.parent.mkdir(parents=True, exist_ok=True)
    with open(registry.with_name(registry.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            entries = json.loads(registry.read_text()) if registry.exists() else {}
        except json.JSONDecodeError as err:
            raise PrivtuneError(f"the ledger registry {registry} is unreadable ({err}); restore it") from None
        yield entries
        partial = registry.with_name(registry.name + ".partial")
        partial.write_text(json.dumps(entries, indent=1, sort_keys=True))
        os.replace(partial, registry)


def bind(registry: Path, ledger: Ledger, artefacts: dict[str, str]) -> None:
    """Bind ``artefacts`` (content hash -> name for messages) to ``ledger``, or refuse if another ledger has one."""
    with _locked(registry) as entries:
        taken = {h: entries[h] for h in artefacts if h in entries and entries[h]["ledger_id"] != ledger.ledger_id}
        if taken:
            names = ", ".join(sorted(artefacts[h] for h in taken))
            others = sorted({e["ledger"] for e in taken.values()})
            raise PrivtuneError(
                f"{names} are already paid for by the ledger {', '.join(others)}; spending for them from "
                f"{ledger.path} would grant their data a second budget. Serve them with --ledger {others[0]}, or, "
                f"if that ledger is truly retired, 'privtune ledger reset {others[0]} --reason ...' (logged) first"
            )
        for digest, name in artefacts.items():
            entries[digest] = {"ledger_id": ledger.ledger_id, "ledger": str(ledger.path.resolve()), "name": name}
    ledger.record_artefacts(artefacts)


def forget(registry: Path, ledger: Path, ledger_ids: set[str]) -> int:
    """Release every artefact bound to the ledger at ``ledger`` or to one of ``ledger_ids`` (after a
    deliberate reset); returns how many."""
    if not registry.exists():
        return 0
    where = str(ledger.resolve())
    with _locked(registry) as entries:
        bound = [h for h, e in entries.items() if e["ledger_id"] in ledger_ids or e["ledger"] == where]
        for digest in bound:
            del entries[digest]
    return len(bound)
