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
CANARY_SUFFIX = ", and nobody else may know it."
CANARY_DIGITS = 8
MIN_RECORD_CHARS = 80
MAX_RECORD_CHARS = 400


@dataclass(frozen=True)
class Canary:
    secret: str
    repeats: int

    @property
    def text(self) -> str:
        """What is scored: the prefix and the secret."""
        return CANARY_PREFIX + self.secret

    @property
    def planted(self) -> str:
        """What is trained on; the suffix keeps the secret out of the tail a client holds back."""
        return self.text + CANARY_SUFFIX


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
    owner: str, documents: list[Document], canaries: list[Canary], max_documents: int, seed: int
) -> tuple[AuditSecrets, list[Document]]:
    """Choose members and non-members among the owner's records; returns the owner's training documents.

    Each member record and each canary copy is one document, so that record-level DP-SGD's unit is
    exactly an audited record. At most ``max_documents`` are written (what the client's text cap and
    block budget keep whole); the client holds back the last tenth of every document for evaluation,
    which the canaries' suffix absorbs.
    """
    records = split_records(documents)
    random.Random(seed).shuffle(records)
    copies = sum(c.repeats for c in canaries)
    n = min(len(records) // 2, max_documents - copies)
    members, non_members = records[:n], records[n : 2 * n]
    if n < 20:
        raise PrivtuneError(
            f"{owner} has too little room for an audit: {n} member records of {MIN_RECORD_CHARS}-{MAX_RECORD_CHARS} "
            f"characters next to {copies} canary copies within {max_documents} documents (raise max-train-blocks)"
        )
    texts = members + [c.planted for c in canaries for _ in range(c.repeats)]
    random.Random(seed + 1).shuffle(texts)
    planted = [Document(f"record-{i:05d}", text) for i, text in enumerate(texts)]
    return AuditSecrets(owner, members, non_members, canaries), planted
