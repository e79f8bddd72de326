"""The audit harness's part before training: plant the secrets in one simulated owner's data."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from privtune.audit.secrets import MAX_RECORD_CHARS, SECRETS_FILE, new_canaries, plant
from privtune.common.corpus import private_partitions, write_documents
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

    Every planted document stays whole in what the client trains on: the client's character cap
    gives each document an equal share, and its block budget holds them all (one character is at
    most one token for every tokenizer privtune ships on this ASCII text).
    """
    owner = f"owner-{owner_index}"
    data = out / "audit" / f"{owner}-data"
    if (out / SECRETS_FILE).exists() and data.is_dir() and not overwrite:
        return {owner_index: {"data-path": str(data)}}
    documents = private_partitions(owners, cfg.seed)[owner_index]
    max_documents = cfg.max_train_blocks * cfg.block_size // (MAX_RECORD_CHARS + 1)
    secrets, planted = plant(owner, documents, new_canaries(canaries, repeats), max_documents, cfg.seed)
    shutil.rmtree(data, ignore_errors=True)
    write_documents(planted, data)
    secrets.save(out)
    return {owner_index: {"data-path": str(data)}}
