"""What the audit harness plants in one owner's data and keeps to itself: canaries and record splits.

The harness plays the audited data owner before training. From that owner's text it draws records
(speeches and paragraphs), gives half of them to training (members) and keeps the other half back
(non-members, same owner, same distribution), and inserts K random secrets into the members, each
repeated r times (Carlini et al. 2019, "The Secret Sharer"). All of it is written to
``audit-secrets.json`` beside the run, never into what the model owner receives.
"""

from __future__ import annotations

import json
import random
import secrets as system_random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from privtune.common.corpus import Document
from privtune.common.errors import PrivtuneError

SECRETS_FILE = "audit-secrets.json"
CANARY_PREFIX = "my account number is "
CANARY_DIGITS = 8
MIN_RECORD_CHARS = 80
MAX_RECORD_CHARS = 400


@dataclass(frozen=True)
class Canary:
    secret: str
    repeats: int

    @property
    def text(self) -> str:
        return CANARY_PREFIX + self.secret


@dataclass
class AuditSecrets:
    """The audited owner, its member and non-member records, and the canaries planted in its data."""

    owner: str
    members: list[str]
    non_members: list[str]
    canaries: list[Canary] = field(default_factory=list)
    candidate_space: int = 10**CANARY_DIGITS

    def save(self, folder: Path) -> Path:
        path = Path(folder) / SECRETS_FILE
        path.write_text(json.dumps(asdict(self), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: Path) -> AuditSecrets:
        try:
            raw = json.loads(Path(path).read_text())
            raw["canaries"] = [Canary(**c) for c in raw.get("canaries", [])]
            return cls(**raw)
        except (OSError, json.JSONDecodeError, TypeError) as err:
            raise PrivtuneError(
                f"{path} is not an audit secrets file ({err}); it is written by 'privtune simulate --canaries K' "
                "or privtune.audit.harness.plant"
            ) from None


def split_records(documents: list[Document]) -> list[str]:
    """Speeches and paragraphs (blank-line separated) of a readable length, in document order."""
    records = []
    for doc in documents:
        for block in doc.text.replace("\r\n", "\n").split("\n\n"):
            text = block.strip()
            if MIN_RECORD_CHARS <= len(text) <= MAX_RECORD_CHARS:
                records.append(text)
    return records


def new_canaries(count: int, repeats: tuple[int, ...]) -> list[Canary]:
    """``count`` secrets of CANARY_DIGITS random digits, repetition counts cycling through ``repeats``."""
    if count < 0 or not repeats or min(repeats) < 1:
        raise PrivtuneError(f"need count >= 0 and repetition counts >= 1, got {count} and {repeats}")
    return [
        Canary("".join(str(system_random.randbelow(10)) for _ in range(CANARY_DIGITS)), repeats[i % len(repeats)])
        for i in range(count)
    ]


def plant(
    owner: str, documents: list[Document], canaries: list[Canary], member_chars: int, heldout_fraction: float, seed: int
) -> tuple[AuditSecrets, str]:
    """Choose members and non-members among the owner's records and write its training document.

    The document holds the member records and the canary copies in a random order, one per
    paragraph, within ``member_chars`` characters (the client trains on a capped prefix of its
    text), then a tail of records nobody scores: the client keeps the last ``heldout_fraction`` of
    every document back for evaluation, and that cut must fall in the tail.
    """
    records = split_records(documents)
    random.Random(seed).shuffle(records)
    half = len(records) // 2
    members, used = [], sum((len(c.text) + 2) * c.repeats for c in canaries)
    for record in records[:half]:
        if used + len(record) + 2 > member_chars:
            break
        members.append(record)
        used += len(record) + 2
    non_members = records[half : half + len(members)]
    tail, tail_chars = [], 0
    for record in records[half + len(members) :]:
        if tail_chars > used * heldout_fraction / (1 - heldout_fraction) + MAX_RECORD_CHARS:
            break
        tail.append(record)
        tail_chars += len(record) + 2
    if len(members) < 20 or len(non_members) < len(members) or tail_chars <= used * heldout_fraction:
        raise PrivtuneError(
            f"{owner} has too little text for an audit: {len(members)} member and {len(non_members)} non-member "
            f"records of {MIN_RECORD_CHARS}-{MAX_RECORD_CHARS} characters within {member_chars} characters"
        )
    paragraphs = members + [c.text for c in canaries for _ in range(c.repeats)]
    random.Random(seed + 1).shuffle(paragraphs)
    return AuditSecrets(owner, members, non_members, canaries), "\n\n".join(paragraphs + tail) + "\n"
