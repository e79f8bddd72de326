"""The data owner's training examples and held-out blocks: load, LDP-perturb (once), encode, pack.

The training examples are what DP-SGD's privacy unit says (:func:`privacy_unit`): under record-level
DP-SGD one row per record (a document, or a paragraph of one), its first ``dp-record-max-tokens``
tokens then padding (:func:`privtune.common.dpsgd.record_examples`); otherwise packed token blocks.
Held-out text is always packed blocks.

Paragraph records are cut from the text at blank lines, so they are refused under LDP: the cut
would read the unperturbed text, and the adapter would depend on where its blank lines were,
which the perturbation's guarantee does not cover. ``dp-records=auto`` therefore takes paragraphs
only for the embedded corpus without LDP (its 42 whole works are far too few records for DP to
leave any signal) and whole documents otherwise.

The training documents are also split into ``member-shards`` disjoint shards by whole documents
(document i goes to shard i mod m), each encoded on its own: shard i trains PMixED member i, and a
document (with all its paragraphs) never feeds two members.

Instruction data (``.jsonl`` conversations, :mod:`privtune.common.instructions`) is one record per
line whatever ``dp-records`` says (a conversation is never cut into paragraphs), is held out whole,
and trains on its responses only: the rows carry labels (:mod:`privtune.common.tokens`) through
packing, training, DP-SGD and evaluation. LDP perturbs every message's content on its own (the
prompt and the response separately; roles and template markup are not private and stay as they
are), charged to the conversation's ledger subject, so they add up to its document epsilon.

The LDP perturbation runs once per owner and data version: the perturbed text is cached in the
workspace and the release is recorded in the ledger only when it is made. Re-running a round (or a
whole run) reuses the same perturbed text, which spends no further privacy; perturbing afresh each
round would compose and multiply the epsilon.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from privtune.client.site import SiteConfig, cap_characters, documents_fingerprint, site_documents
from privtune.common.corpus import Document
from privtune.common.dpsgd import PrivacyUnit, block_unit, record_unit
from privtune.common.errors import PrivtuneError
from privtune.common.federation.config import FederationConfig
from privtune.common.instructions import Turn
from privtune.common.ldp.perturb import content_subject
from privtune.common.packing import document_tokens, holdout_split, pack_rows, record_rows
from privtune.common.text_tokenizer import TextTokenizer
from privtune.common.tokens import TokenRows

if TYPE_CHECKING:
    from privtune.common.ldp.mechanisms import Mechanism
    from privtune.common.ldp.perturb import LdpRelease
    from privtune.common.ledger import Ledger

HELDOUT_FRACTION = 0.1
MAX_EVAL_BLOCKS = 32
PARAGRAPH_BREAK = re.compile(r"\n[ \t\r\f\v]*\n")


@dataclass
class OwnerData:
    train: TokenRows
    """One row per training example of ``unit``."""
    heldout: TokenRows
    ldp: dict[str, float]
    shards: list[TokenRows]
    """The training examples of each member shard."""
    unit: PrivacyUnit


def record_level(cfg: FederationConfig) -> bool:
    """Whether training examples are whole records: under DP-SGD with ``dp-unit = record``."""
    return cfg.dp_epsilon > 0 and cfg.dp_unit == "record"


def records_kind(cfg: FederationConfig, site: SiteConfig) -> str:
    """What one record is, ``documents`` or ``paragraphs`` (``auto`` resolved; see the module docstring)."""
    if cfg.dp_records == "paragraphs" and cfg.ldp_epsilon > 0:
        raise PrivtuneError(
            "dp-records=paragraphs cuts the unperturbed text at blank lines, which LDP does not cover; with "
            "ldp-epsilon > 0 use dp-records=documents (or auto), or dp-unit=block"
        )
    if cfg.dp_records != "auto":
        return cfg.dp_records
    return "paragraphs" if site.data_path is None and cfg.ldp_epsilon == 0 else "documents"


def privacy_unit(cfg: FederationConfig, site: SiteConfig) -> PrivacyUnit:
    """What one DP-SGD training example of this owner is."""
    if cfg.dp_unit == "block":
        return block_unit(cfg.block_size)
    return record_unit(records_kind(cfg, site), cfg.dp_record_max_tokens)


def paragraphs(document: Document) -> list[str]:
    return [p for p in PARAGRAPH_BREAK.split(document.text) if p.strip()]


def records_of(documents: list[Document], records: str) -> list[Document]:
    """The records: each document, or each paragraph of a text document (a conversation stays whole)."""
    if records != "paragraphs":
        return documents
    return [
        part for doc in documents for part in ([doc] if doc.turns else [Document(doc.name, p) for p in paragraphs(doc)])
    ]


def encode_records(documents: list[Document], records: str, tokenizer: TextTokenizer, max_tokens: int) -> TokenRows:
    """One padded row per record: the first ``max_tokens`` of its tokens (:func:`document_tokens`)."""

    def head(doc: Document) -> Document:
        # Only a record's first tokens are trained on: eight characters a token is a generous prefix to encode.
        return doc if doc.turns else Document(doc.name, doc.text[: 8 * max_tokens])

    return record_rows([document_tokens(head(doc), tokenizer) for doc in records_of(documents, records)], max_tokens)


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
    site: SiteConfig, cfg: FederationConfig, documents: list[Document], subjects: list[str]
) -> tuple[list[Document], dict[str, float]]:
    """LDP-perturbed copies of the documents, made once and cached; records each release against its
    document's ledger subject (``subjects``: the content hash of the whole original document, so a
    renamed, copied or differently capped document keeps its budget)."""
    if cfg.ldp_epsilon <= 0:
        return documents, {}
    cache = site.workspace / "ldp" / f"{documents_fingerprint(documents, cfg.ldp_epsilon, cfg.ldp_embedding)}.json"
    if cache.exists():
        saved = json.loads(cache.read_text())
        return [uncached(d) for d in saved["documents"]], saved["privacy"]
    from privtune.common.ldp.perturb import LdpConfig, build_mechanism
    from privtune.common.ledger import Ledger

    ledger = Ledger(site.ledger_path, site.owner)
    if math.isfinite(site.ldp_budget) and ledger.budget("ldp") is None:
        ledger.set_budget("ldp", site.ldp_budget)
    mechanism = build_mechanism(LdpConfig(epsilon=cfg.ldp_epsilon, embedding=cfg.ldp_embedding))
    perturbed, releases = [], []
    for doc, subject in zip(documents, subjects, strict=True):
        copy, spent = perturb_document(doc, mechanism, ledger, subject)
        perturbed.append(copy)
        releases.append(spent)
    privacy = {
        "ldp-epsilon-token": mechanism.guarantee.token_epsilon,
        "ldp-epsilon-document-max": max(sum(r.document_epsilon for r in spent) for spent in releases),
    }
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"documents": [cached(d) for d in perturbed], "privacy": privacy}))
    return perturbed, privacy


def perturb_document(
    doc: Document, mechanism: Mechanism, ledger: Ledger, subject: str
) -> tuple[Document, list[LdpRelease]]:
    """The document with its text (or each message's content) perturbed; its releases, all charged to ``subject``."""
    from privtune.common.ldp.perturb import perturb_text

    releases: list[LdpRelease] = []

    def perturb(text: str) -> str:
        if not text:
            return text
        out, release = perturb_text(text, mechanism, ledger=ledger, document_id=subject)
        releases.append(release)
        return out

    if doc.turns:
        return Document.conversation(doc.name, tuple(Turn(t.role, perturb(t.content)) for t in doc.turns)), releases
    return Document(doc.name, perturb(doc.text)), releases


def cached(document: Document) -> dict:
    if document.turns:
        return {"name": document.name, "turns": [[t.role, t.content] for t in document.turns]}
    return {"name": document.name, "text": document.text}


def uncached(saved: dict) -> Document:
    if "turns" in saved:
        return Document.conversation(saved["name"], tuple(Turn(role, content) for role, content in saved["turns"]))
    return Document(saved["name"], saved["text"])


def ledger_subjects(documents: list[Document], train_docs: list[Document]) -> list[str]:
    """The ledger subject of each training document: the content hash of the whole original document.

    A conversation is never cut, so its own hash is its original's; text documents are cut but all
    kept, in order, by the held-out split and the cap, so the i-th is the i-th original text.
    """

    def subject(doc: Document) -> str:
        return content_subject(hashlib.sha256(doc.text.encode()).hexdigest())

    texts = iter([subject(doc) for doc in documents if not doc.turns])
    return [subject(doc) if doc.turns else next(texts) for doc in train_docs]


def load_owner_data(site: SiteConfig, cfg: FederationConfig, tokenizer: TextTokenizer) -> OwnerData:
    documents = site_documents(site, cfg.seed)
    split = holdout_split(documents, HELDOUT_FRACTION)
    # Two characters per token is generous for bytes and ULT symbols alike; the rest is never read.
    train_docs = cap_characters(split.train, 2 * cfg.max_train_blocks * cfg.block_size)
    train_docs, ldp = perturbed_documents(site, cfg, train_docs, ledger_subjects(documents, train_docs))
    heldout_docs = cap_characters(split.heldout, 2 * MAX_EVAL_BLOCKS * cfg.block_size)
    unit = privacy_unit(cfg, site)
    if record_level(cfg):
        kind = records_kind(cfg, site)

        def examples(docs: list[Document]) -> TokenRows:
            return encode_records(docs, kind, tokenizer, cfg.dp_record_max_tokens)
    else:

        def examples(docs: list[Document]) -> TokenRows:
            return pack_rows(docs, tokenizer, cfg.block_size, cfg.max_train_blocks)

    train = examples(train_docs)
    return OwnerData(
        train=train,
        heldout=pack_rows(heldout_docs, tokenizer, cfg.block_size, MAX_EVAL_BLOCKS),
        ldp=ldp,
        shards=member_shards(train, train_docs, examples, cfg.member_shards),
        unit=unit,
    )


def member_shards(
    train: TokenRows, documents: list[Document], examples: Callable[[list[Document]], TokenRows], m: int
) -> list[TokenRows]:
    """The training examples of each of ``m`` member shards (all of them for one shard); refuses an empty shard."""
    if m <= 1:
        return [train][:m]
    if len(documents) < m:
        raise PrivtuneError(f"member-shards {m} needs at least {m} training documents, this owner has {len(documents)}")
    return [examples(documents[i::m]) for i in range(m)]


def describe(data: OwnerData) -> str:
    return json.dumps(
        {"train_examples": len(data.train), "unit": data.unit.name, "heldout_blocks": len(data.heldout), **data.ldp}
    )
