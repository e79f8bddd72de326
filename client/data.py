"""The data owner's training and held-out blocks: load, LDP-perturb (once), encode, pack.

The training documents are also split into ``member-shards`` disjoint shards by whole documents
(document i goes to shard i mod m), each packed on its own: shard i trains PMixED member i, and a
document never feeds two members.

The LDP perturbation runs once per owner and data version: the perturbed text is cached in the
workspace and the release is recorded in the ledger only when it is made. Re-running a round (or a
whole run) reuses the same perturbed text, which spends no further privacy; perturbing afresh each
round would compose and multiply the epsilon.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch

from privtune.client.site import SiteConfig, cap_characters, documents_fingerprint, site_documents
from privtune.common.corpus import Document
from privtune.common.errors import PrivtuneError
from privtune.common.federation.config import FederationConfig
from privtune.common.packing import holdout_split, pack
from privtune.common.text_tokenizer import TextTokenizer

HELDOUT_FRACTION = 0.1
MAX_EVAL_BLOCKS = 32


@dataclass
class OwnerData:
    train: torch.Tensor
    heldout: torch.Tensor
    ldp: dict[str, float]
    shards: list[torch.Tensor]


def owner_tokenizer(site: SiteConfig, cfg: FederationConfig) -> TextTokenizer:
    if cfg.encoding == "ult":
        from privtune.common.ult.tokenizer import UltTokenizer

        if site.ult_table is None or site.ult_key is None:
            raise PrivtuneError(
                f"{site.owner}: encoding 'ult' needs node config ult-table and ult-key "
                "(the federation table and the shared federation key file)"
            )
        return UltTokenizer.from_files(site.ult_table, key_file=site.ult_key)
    from privtune.common.models import load_tokenizer

    return load_tokenizer(cfg.model)


def perturbed_documents(
    site: SiteConfig, cfg: FederationConfig, documents: list[Document]
) -> tuple[list[Document], dict[str, float]]:
    """LDP-perturbed copies of the documents, made once and cached; records the release."""
    if cfg.ldp_epsilon <= 0:
        return documents, {}
    cache = site.workspace / "ldp" / f"{documents_fingerprint(documents, cfg.ldp_epsilon, cfg.ldp_embedding)}.json"
    if cache.exists():
        saved = json.loads(cache.read_text())
        return [Document(d["name"], d["text"]) for d in saved["documents"]], saved["privacy"]
    from privtune.common.ldp.perturb import LdpConfig, build_mechanism, perturb_text
    from privtune.common.ledger import Ledger

    ledger = Ledger(site.ledger_path, site.owner)
    if math.isfinite(site.ldp_budget) and ledger.budget("ldp") is None:
        ledger.set_budget("ldp", site.ldp_budget)
    mechanism = build_mechanism(LdpConfig(epsilon=cfg.ldp_epsilon, embedding=cfg.ldp_embedding))
    perturbed, releases = [], []
    for doc in documents:
        text, release = perturb_text(doc.text, mechanism, ledger=ledger, document_id=doc.name)
        perturbed.append(Document(doc.name, text))
        releases.append(release)
    privacy = {
        "ldp-epsilon-token": releases[0].token_epsilon,
        "ldp-epsilon-document-max": max(r.document_epsilon for r in releases),
    }
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(
        json.dumps({"documents": [{"name": d.name, "text": d.text} for d in perturbed], "privacy": privacy})
    )
    return perturbed, privacy


def load_owner_data(site: SiteConfig, cfg: FederationConfig, tokenizer: TextTokenizer) -> OwnerData:
    documents = site_documents(site, cfg.seed)
    split = holdout_split(documents, HELDOUT_FRACTION)
    # Two characters per token is generous for bytes and ULT symbols alike; the rest is never read.
    train_docs = cap_characters(split.train, 2 * cfg.max_train_blocks * cfg.block_size)
    train_docs, ldp = perturbed_documents(site, cfg, train_docs)
    heldout_docs = cap_characters(split.heldout, 2 * MAX_EVAL_BLOCKS * cfg.block_size)
    train = pack(train_docs, tokenizer, cfg.block_size, cfg.max_train_blocks)
    return OwnerData(
        train=train,
        heldout=pack(heldout_docs, tokenizer, cfg.block_size, MAX_EVAL_BLOCKS),
        ldp=ldp,
        shards=member_shards(train, train_docs, tokenizer, cfg),
    )


def member_shards(
    train: torch.Tensor, documents: list[Document], tokenizer: TextTokenizer, cfg: FederationConfig
) -> list[torch.Tensor]:
    """The training blocks of each member shard (all of them for one shard); refuses an empty shard."""
    m = cfg.member_shards
    if m <= 1:
        return [train][:m]
    if len(documents) < m:
        raise PrivtuneError(f"member-shards {m} needs at least {m} training documents, this owner has {len(documents)}")
    return [pack(documents[i::m], tokenizer, cfg.block_size, cfg.max_train_blocks) for i in range(m)]


def describe(data: OwnerData) -> str:
    return json.dumps({"train_blocks": len(data.train), "heldout_blocks": len(data.heldout), **data.ldp})
