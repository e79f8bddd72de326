"""The data owner's training and held-out blocks: load, LDP-perturb (once), encode, pack.

The LDP perturbation runs once per owner and data version: the perturbed text is cached in the
workspace and the release is recorded in the ledger only when it is made. Re-running a round (or a
whole run) reuses the same perturbed text, which spends no further privacy; perturbing afresh each
round would compose and multiply the epsilon.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from client.site import SiteConfig, cap_characters, documents_fingerprint, site_documents
from common.corpus import Document
from common.federation.config import FederationConfig
from common.packing import holdout_split, pack
from common.text_tokenizer import TextTokenizer

HELDOUT_FRACTION = 0.1
MAX_EVAL_BLOCKS = 32


@dataclass
class OwnerData:
    train: torch.Tensor
    heldout: torch.Tensor
    ldp: dict[str, float]


def owner_tokenizer(site: SiteConfig, cfg: FederationConfig) -> TextTokenizer:
    if cfg.encoding == "ult":
        from common.ult.tokenizer import UltTokenizer

        if site.ult_table is None or site.ult_key is None:
            from common.errors import PrivtuneError

            raise PrivtuneError(f"{site.owner}: encoding 'ult' needs node config ult-table and ult-key "
                                "(the federation table and the shared federation key file)")
        return UltTokenizer.from_files(site.ult_table, key_file=site.ult_key)
    from common.models import load_tokenizer

    return load_tokenizer(cfg.model)


def perturbed_documents(site: SiteConfig, cfg: FederationConfig, documents: list[Document]) -> tuple[list[Document], dict[str, float]]:
    """LDP-perturbed copies of the documents, made once and cached; records the release."""
    if cfg.ldp_epsilon <= 0:
        return documents, {}
    from common.ldp.owner import perturb_documents_once

    return perturb_documents_once(site.workspace, site.ledger_path, documents, cfg.ldp_epsilon, cfg.ldp_embedding,
                                  documents_fingerprint(documents, cfg.ldp_epsilon, cfg.ldp_embedding), site.ldp_budget)


def load_owner_data(site: SiteConfig, cfg: FederationConfig, tokenizer: TextTokenizer) -> OwnerData:
    documents = site_documents(site, cfg.seed)
    split = holdout_split(documents, HELDOUT_FRACTION)
    # Two characters per token is generous for bytes and ULT symbols alike; the rest is never read.
    train_docs = cap_characters(split.train, 2 * cfg.max_train_blocks * cfg.block_size)
    train_docs, ldp = perturbed_documents(site, cfg, train_docs)
    heldout_docs = cap_characters(split.heldout, 2 * MAX_EVAL_BLOCKS * cfg.block_size)
    return OwnerData(
        train=pack(train_docs, tokenizer, cfg.block_size, cfg.max_train_blocks),
        heldout=pack(heldout_docs, tokenizer, cfg.block_size, MAX_EVAL_BLOCKS),
        ldp=ldp,
    )


def describe(data: OwnerData) -> str:
    return json.dumps({"train_blocks": len(data.train), "heldout_blocks": len(data.heldout), **data.ldp})
