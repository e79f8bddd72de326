"""Perturbing a text document and accounting for it: text in, text plus an :class:`LdpRelease` out.

The text is tokenised with the embedding's tokenizer, every token is replaced by the mechanism's
draw, and the ids are decoded back to text, so the result composes with whatever encodes it next
(ULT, another model's tokenizer): re-tokenising is post-processing and costs no privacy.

Per document, the per-token guarantees compose additively: a document of n tokens is
(n * token_epsilon)-LDP against any other document of n tokens whose tokens differ pairwise within
the mechanism's scope (``metric``: any tokens; ``within-cell``: tokens of the same CusText cell).
The number of tokens itself is released, i.e. not protected. Special tokens produced by the
mechanism decode to nothing (the tokenizers skip them), which is post-processing too.

When a ledger is given the release is recorded before anything is sampled, and a release that would
exceed the ledger's per-document budget is refused with nothing perturbed. A file's ledger subject
is the SHA-256 of its content, so renaming or copying a document never resets its budget.

Files are streamed: read, hashed and tokenised in pieces cut at whitespace (so a word is not split
and a byte-level BPE tokenises it as it would in context), sampled as one id sequence under the
mechanism's memory cap, and decoded and written piece by piece. Peak memory is then the ids plus one
piece, not the tokenizer's bookkeeping of the whole text.
"""

from __future__ import annotations

import codecs
import hashlib
import re
import secrets
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from privtune.common.errors import PrivtuneError
from privtune.common.ldp.embedding import EmbeddingSpace, load_embedding
from privtune.common.ldp.mechanisms import CusText, Mechanism, SanText, check_parameters

MECHANISMS = ("santext", "custext")
PIECE_BYTES = 1 << 20
LAST_WHITESPACE = re.compile(r"\s(?=\S*\Z)")


@dataclass(frozen=True)
class LdpConfig:
    """How to perturb: mechanism, its epsilon, the embedding (see ``load_embedding``) and memory cap."""

    epsilon: float
    mechanism: str = "santext"
    embedding: str = "smollm2"
    top_k: int = 20
    memory_cap_mb: float = 256.0

    def __post_init__(self) -> None:
        check_parameters(self.epsilon, self.memory_cap_mb)


@dataclass(frozen=True)
class LdpRelease:
    """The guarantee of one perturbed document, as recorded in the ledger (kind ``ldp``, unit document)."""

    mechanism: str
    epsilon: float
    embedding: str
    n_tokens: int
    token_epsilon: float
    document_epsilon: float
    scope: str
    domain: str
    metric_epsilon: float | None
    metric_slack: float
    diameter: float | None
    unit: str = "token"

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        lines = [f"mechanism: {self.mechanism} (epsilon parameter {self.epsilon:g}) over {self.embedding} embeddings"]
        if self.metric_epsilon is not None:
            lines.append(
                f"per token, metric: {self.metric_epsilon:g} * d(x, x') + {self.metric_slack:.2g}-LDP "
                f"(d = Euclidean distance of the token embeddings, diameter {self.diameter:.6g})"
            )
        lines.append(f"per token: {self.token_epsilon:.6g}-LDP ({self.scope} scope) between {self.domain}")
        lines.append(
            f"per document: {self.document_epsilon:.6g}-LDP ({self.scope} scope) = {self.n_tokens} tokens x "
            f"{self.token_epsilon:.6g}, between documents whose tokens differ pairwise within that scope; "
            "the number of tokens is not protected"
        )
        return "\n".join(lines)


def build_mechanism(config: LdpConfig, space: EmbeddingSpace | None = None) -> Mechanism:
    """The configured mechanism over ``space`` (loaded from ``config.embedding`` when not given)."""
    if config.mechanism not in MECHANISMS:
        raise PrivtuneError(f"unknown LDP mechanism {config.mechanism!r}; choose one of {', '.join(MECHANISMS)}")
    space = space if space is not None else load_embedding(config.embedding)
    if config.mechanism == "custext":
        return CusText(space, config.epsilon, config.top_k, config.memory_cap_mb)
    return SanText(space, config.epsilon, config.memory_cap_mb)


def release_for(mechanism: Mechanism, n_tokens: int) -> LdpRelease:
    """The guarantee of perturbing ``n_tokens`` tokens, known before any sampling."""
    token = mechanism.guarantee
    return LdpRelease(
        mechanism=mechanism.name,
        epsilon=mechanism.epsilon,
        embedding=f"{mechanism.space.name} (sha256 {mechanism.space.digest[:12]})",
        n_tokens=n_tokens,
        token_epsilon=token.token_epsilon,
        document_epsilon=n_tokens * token.token_epsilon,
        scope=token.scope,
        domain=token.domain,
        metric_epsilon=token.metric_epsilon,
        metric_slack=token.metric_slack,
        diameter=token.diameter,
    )


def make_generator(seed: int | None = None) -> torch.Generator:
    """A generator seeded from ``secrets`` unless an explicit seed (tests, reproducible demos) is given."""
    return torch.Generator().manual_seed(secrets.randbits(64) if seed is None else int(seed))


def content_subject(digest: str) -> str:
    """The ledger subject of a document: its content's SHA-256, whatever its name or location."""
    return f"sha256:{digest}"


def _charge(mechanism: Mechanism, n_tokens: int, ledger, document_id: str) -> LdpRelease:
    release = release_for(mechanism, n_tokens)
    if ledger is not None:
        ledger.spend("ldp", release.document_epsilon, subject=document_id, details=release.to_dict())
    return release


def perturb_text(
    text: str, mechanism: Mechanism, *, seed: int | None = None, ledger=None, document_id: str = ""
) -> tuple[str, LdpRelease]:
    """Perturb every token of ``text``; return the perturbed text and its guarantee.

    ``ledger`` (a :class:`common.ledger.Ledger`) records the release under ``document_id`` before
    sampling; releases that share an id add up against the per-document budget, so the default (one
    shared id) is the conservative choice.
    """
    ids = mechanism.space.encode(text)
    release = _charge(mechanism, len(ids), ledger, document_id)
    perturbed = mechanism.sample(ids, make_generator(seed))
    return mechanism.space.decode(perturbed), release


def text_pieces(path: Path, digest, piece_bytes: int = PIECE_BYTES) -> Iterator[str]:
    """The file's text in pieces of about ``piece_bytes``, each cut before its last whitespace; feeds ``digest``.

    Concatenated, the pieces are the file's text exactly. A window without whitespace is cut where it ends.
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    carry = ""
    with path.open("rb") as handle:
        while block := handle.read(piece_bytes):
            digest.update(block)
            text = carry + decoder.decode(block)
            found = LAST_WHITESPACE.search(text)
            cut = found.start() if found is not None and found.start() > 0 else len(text)
            if cut:
                yield text[:cut]
            carry = text[cut:]
    carry += decoder.decode(b"", final=True)
    if carry:
        yield carry


def perturb_file(
    source: Path,
    target: Path,
    mechanism: Mechanism,
    *,
    seed: int | None = None,
    ledger=None,
    document_id: str | None = None,
    piece_bytes: int = PIECE_BYTES,
) -> tuple[LdpRelease, str]:
    """Perturb a UTF-8 file into ``target``, streamed (module docstring); returns the release and its subject.

    The subject is ``document_id`` when given, else :func:`content_subject` of the file's bytes.
    """
    digest = hashlib.sha256()
    try:
        pieces = [mechanism.space.encode(piece) for piece in text_pieces(source, digest, piece_bytes)]
    except (OSError, UnicodeDecodeError) as err:
        raise PrivtuneError(f"cannot read {source} as UTF-8 text ({err})") from None
    subject = document_id if document_id is not None else content_subject(digest.hexdigest())
    ids = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)
    release = _charge(mechanism, len(ids), ledger, subject)
    perturbed = mechanism.sample(ids, make_generator(seed)).split([len(piece) for piece in pieces])
    try:
        with target.open("w", encoding="utf-8") as handle:
            for piece in perturbed:
                handle.write(mechanism.space.decode(piece))
    except OSError as err:
        raise PrivtuneError(f"cannot write {target} ({err}); the release is already recorded in the ledger") from None
    return release, subject
