"""A data owner's site: where its text, privacy ledger, encoding keys and caches live.

Everything here stays on the owner's machine. The site is described by Flower's *node config*
(set when a SuperNode starts, or per virtual node in simulation):

- ``data-path``: folder of ``.txt``/``.jsonl`` files (simulation default: the owner's partition of
  the embedded Shakespeare corpus, chosen by ``partition-id``);
- ``workspace``: folder for the ledger and caches. Required on a real site: the run config (and its
  ``run-dir``) is the model owner's, who must not choose where the owner's ledger lives (a fresh
  folder would be a fresh budget). Only virtual nodes (``partition-id``) default to
  ``<run-dir>/owners/owner-<id>``, every party being this machine's user;
- ``ult-table`` / ``ult-key``: the federation's ULT table and the shared federation key (ULT mode);
- ``ldp-budget``: cap on the per-document LDP epsilon; ``dp-budget``: cap on DP-SGD epsilon.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from privtune.common.corpus import Document, local_documents, private_partitions
from privtune.common.errors import PrivtuneError
from privtune.common.federation.config import FederationConfig

LEDGER_FILE = "ledger.sqlite"


@dataclass(frozen=True)
class SiteConfig:
    owner: str
    workspace: Path
    data_path: Path | None
    partition: int | None
    num_partitions: int | None
    ult_table: Path | None
    ult_key: Path | None
    ldp_budget: float
    dp_budget: float

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any], cfg: FederationConfig) -> SiteConfig:
        partition = node_config.get("partition-id")
        owner = str(node_config.get("owner", f"owner-{partition}" if partition is not None else "owner"))
        if node_config.get("workspace"):
            workspace = Path(str(node_config["workspace"]))
        elif partition is not None:
            workspace = Path(cfg.run_dir) / "owners" / owner
        else:
            raise PrivtuneError(
                f"{owner}: no workspace in the node config; start the SuperNode with "
                "--node-config \"workspace='/path/for/ledger/and/caches'\" (deploy/supernode.sh sets it)"
            )
        optional = {
            k: Path(str(node_config[k])) if node_config.get(k) else None for k in ("data-path", "ult-table", "ult-key")
        }
        return cls(
            owner=owner,
            workspace=workspace,
            data_path=optional["data-path"],
            partition=None if partition is None else int(partition),
            num_partitions=None if node_config.get("num-partitions") is None else int(node_config["num-partitions"]),
            ult_table=optional["ult-table"],
            ult_key=optional["ult-key"],
            ldp_budget=float(node_config.get("ldp-budget", float("inf"))),
            dp_budget=float(node_config.get("dp-budget", 10.0)),
        )

    @property
    def ledger_path(self) -> Path:
        return self.workspace / LEDGER_FILE


def site_documents(site: SiteConfig, seed: int) -> list[Document]:
    """The owner's private documents: its data folder, or its partition of the embedded corpus."""
    if site.data_path is not None:
        return local_documents(site.data_path)
    if site.partition is None or site.num_partitions is None:
        raise PrivtuneError(
            f"{site.owner}: no data-path in the node config and no partition-id to pick "
            "embedded data; start the SuperNode with --node-config \"data-path='/path/to/texts'\""
        )
    return private_partitions(site.num_partitions, seed)[site.partition]


def documents_fingerprint(documents: list[Document], *params: Any) -> str:
    digest = hashlib.sha256(json.dumps([params], default=str).encode())
    for doc in documents:
        digest.update(doc.name.encode() + b"\0" + doc.text.encode() + b"\0")
    return digest.hexdigest()[:24]


def cap_characters(documents: list[Document], max_chars: int) -> list[Document]:
    """An equal share of ``max_chars`` from the start of every text document; whole conversations.

    LDP and encoding cost grows with text length while training only reads ``max-train-blocks``
    blocks; taking a share of each document keeps every work represented. A conversation is not cut
    (its response is at the end): the conversations pool their shares and the first ones that fit
    are kept, at least one.
    """
    share = max(1, max_chars // max(1, len(documents)))
    pool = share * sum(1 for doc in documents if doc.turns)
    capped, used = [], 0
    for doc in documents:
        if not doc.turns:
            capped.append(Document(doc.name, doc.text[:share]))
        elif used == 0 or used + len(doc.text) <= pool:
            capped.append(doc)
            used += len(doc.text)
    return capped
