"""Which data an adapter depends on, recorded beside it, and the check that PMixED members are disjoint.

PMixED's guarantee is per member: the privacy unit is one member's training data. It holds only if
no two members saw the same data, so every adapter the service may load records ``depends_on`` in
its manifest file: the owners whose data shaped it (directly or through an aggregate it started
from) and, for an owner that split its data into disjoint shards, which shard.

Decision on shards: two members of the same owner are disjoint only when both record a shard of
the SAME split (same ``split`` id, same number of shards) with different indices; a whole-data
member and any other member of that owner overlap, as do shards of different splits. An owner
with m shard members is then protected m times over: the PMixED figure is per shard, and an
owner's whole data is a group of m units (group privacy), which the service's ledger does not sum.

A federated aggregate depends on every owner whose update it absorbed (and on every earlier
aggregate), so it is refused as a member by the one-owner rule.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from privtune.common.errors import PrivtuneError

DEPENDS_ON = "depends_on"


@dataclass(frozen=True)
class DependsOn:
    """The owners whose data an adapter depends on, and the shard of a one-owner member."""

    owners: tuple[str, ...]
    shard: int = 0
    shards: int = 1
    split: str = ""

    def __post_init__(self) -> None:
        if not self.owners:
            raise PrivtuneError("an adapter depends on at least one owner's data")
        if not 0 <= self.shard < self.shards:
            raise PrivtuneError(f"shard {self.shard} is not one of {self.shards} shards")

    @property
    def whole(self) -> bool:
        return self.shards == 1

    def describe(self) -> str:
        owners = "+".join(self.owners)
        return owners if self.whole else f"{owners} shard {self.shard + 1}/{self.shards} of split {self.split!r}"

    def to_dict(self) -> dict[str, Any]:
        return {"owners": list(self.owners), "shard": self.shard, "shards": self.shards, "split": self.split}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DependsOn:
        try:
            return cls(
                tuple(str(o) for o in data["owners"]),
                int(data.get("shard", 0)),
                int(data.get("shards", 1)),
                str(data.get("split", "")),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise PrivtuneError(f"malformed {DEPENDS_ON} record {dict(data)!r} ({err})") from None

    def overlaps(self, other: DependsOn) -> bool:
        """Whether the two adapters may have seen a common training example."""
        if not set(self.owners) & set(other.owners):
            return False
        disjoint_shards = (
            len(self.owners) == len(other.owners) == 1
            and not self.whole
            and self.split != ""
            and (self.split, self.shards) == (other.split, other.shards)
            and self.shard != other.shard
        )
        return not disjoint_shards


def manifest_file(folder: Path) -> Path:
    """The privtune manifest of the adapter folder ``folder``."""
    from privtune.common.offsite.adapter import MANIFEST_FILE

    return folder / MANIFEST_FILE


def record_depends_on(folder: Path, depends_on: DependsOn) -> None:
    """Add ``depends_on`` to the manifest of the adapter saved in ``folder``."""
    path = manifest_file(folder)
    manifest = json.loads(path.read_text())
    manifest[DEPENDS_ON] = depends_on.to_dict()
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def depends_on_of(manifest: Mapping[str, Any], where: str) -> DependsOn:
    if DEPENDS_ON not in manifest:
        raise PrivtuneError(
            f"{where} does not record which owners' data it depends on ({DEPENDS_ON} in its manifest); PMixED's "
            "per-member guarantee needs it. Serve the member adapters a federated run writes (adapters/<owner>/, "
            "trained from the public start on one owner's data), or record it with "
            "privtune.common.federation.provenance.record_depends_on if you trained the adapter on one owner's data"
        )
    return DependsOn.from_dict(manifest[DEPENDS_ON])


def check_disjoint_members(members: Sequence[tuple[str, DependsOn, str]]) -> None:
    """Refuse an ensemble whose members are not one owner's data each, pairwise disjoint, and distinct.

    ``members``: (name, depends_on, content digest) per member. Identical tensors count as one
    member's data whatever their records say (``--adapters A A A`` must not count one owner thrice).
    """
    problems = [
        f"{name} depends on {len(dep.owners)} owners ({', '.join(dep.owners)}): a member must be trained on one "
        "owner's data alone (the run's aggregate is never a member)"
        for name, dep, _ in members
        if len(dep.owners) != 1
    ]
    for i, (name, dep, digest) in enumerate(members):
        for other, other_dep, other_digest in members[i + 1 :]:
            if digest == other_digest:
                problems.append(f"{name} and {other} are identical adapters (one member's data counted twice)")
            elif len(dep.owners) == 1 == len(other_dep.owners) and dep.overlaps(other_dep):
                problems.append(
                    f"{name} ({dep.describe()}) and {other} ({other_dep.describe()}) share data of owner "
                    f"{', '.join(sorted(set(dep.owners) & set(other_dep.owners)))}"
                )
    if problems:
        raise PrivtuneError(
            "PMixED members must be trained on pairwise disjoint data (its guarantee is per member's data): "
            + "; ".join(problems)
            + ". Serve one member per owner (or per disjoint shard of an owner's data)"
        )
