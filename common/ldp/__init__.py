"""Local differential privacy for text: token-level exponential mechanisms (SanText, CusText).

Typical use::

    mechanism = build_mechanism(LdpConfig(epsilon=2.0))          # SmolLM2's embeddings by default
    text, release = perturb_text(private_text, mechanism, ledger=ledger, document_id="doc-17")
    print(release.describe())
"""

from privtune.common.ldp.embedding import EmbeddingSpace, load_embedding
from privtune.common.ldp.mechanisms import CusText, Mechanism, SanText, TokenGuarantee
from privtune.common.ldp.perturb import (
    LdpConfig,
    LdpRelease,
    build_mechanism,
    make_generator,
    perturb_text,
    release_for,
)

__all__ = [
    "CusText",
    "EmbeddingSpace",
    "LdpConfig",
    "LdpRelease",
    "Mechanism",
    "SanText",
    "TokenGuarantee",
    "build_mechanism",
    "load_embedding",
    "make_generator",
    "perturb_text",
    "release_for",
]
