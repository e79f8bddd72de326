"""The audit harness's part before training: plant the secrets in one simulated owner's data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from privtune.audit.secrets import SECRETS_FILE, new_canaries, plant
from privtune.client.data import HELDOUT_FRACTION
from privtune.common.corpus import private_partitions
from privtune.common.federation.config import FederationConfig

DEFAULT_REPEATS = (1, 4, 16)


def plant_secrets(
    cfg: FederationConfig,
    owners: int,
    out: Path,
    canaries: int,
    repeats: tuple[int, ...] = DEFAULT_REPEATS,
    owner_index: int = 0,
    overwrite: bool = False,
) -> dict[int, dict[str, Any]]:
    """Write the audited owner's training text and ``out/audit-secrets.json``; returns its node config.

    A run that resumes keeps the secrets it was planted with (new ones would not be in the rounds
    already trained); ``overwrite`` draws new ones.

    The member text stays below what the client trains on: its character cap and its block budget
    (one character is at least one token for every tokenizer privtune ships, a margin covers
    multi-byte characters).
    """
    owner = f"owner-{owner_index}"
    data = out / "audit" / f"{owner}-data"
    if (out / SECRETS_FILE).exists() and (data / "train.txt").exists() and not overwrite:
        return {owner_index: {"data-path": str(data)}}
    documents = private_partitions(owners, cfg.seed)[owner_index]
    member_chars = int(0.9 * cfg.max_train_blocks * cfg.block_size)
    secrets, text = plant(owner, documents, new_canaries(canaries, repeats), member_chars, HELDOUT_FRACTION, cfg.seed)
    data.mkdir(parents=True, exist_ok=True)
    (data / "train.txt").write_text(text, encoding="utf-8")
    secrets.save(out)
    return {owner_index: {"data-path": str(data)}}
