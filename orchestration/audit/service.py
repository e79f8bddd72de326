"""Membership inference against the PMixED service through its API alone.

The attacker sees only sampled tokens. For each record it asks for the next token after a few of
the record's prefixes; the score is how often the service answers with the record's true next token.
Every question is one query of the service's budget, so the attack spends what any user would, and
the service's own (epsilon, delta) over all its queries is the limit the result is held against.
"""

from __future__ import annotations

import numpy as np

from privtune.audit.targets import Claim
from privtune.client.query import InferenceClient
from privtune.common.errors import PrivtuneError
from privtune.common.text_tokenizer import TextTokenizer

POSITIONS = 4


def prefixes(ids: list[int], positions: int = POSITIONS) -> list[int]:
    """Evenly spaced cut points in the record's second half: enough context to be specific."""
    if len(ids) < 4:
        return []
    return sorted({int(p) for p in np.linspace(len(ids) // 2, len(ids) - 1, positions)})


def service_scores(
    client: InferenceClient, tokenizer: TextTokenizer, records: list[str], positions: int = POSITIONS
) -> tuple[np.ndarray, int]:
    """Per record, the fraction of prefixes the service continues with the true next token."""
    scores, spent = [], 0
    for text in records:
        ids = tokenizer.encode(text)
        cuts = prefixes(ids, positions)
        hits = 0
        for cut in cuts:
            hits += int(client.next_token(ids[:cut]).id == ids[cut])
            spent += 1
        scores.append(hits / max(len(cuts), 1))
    return np.array(scores, dtype=np.float64), spent


def plan_records(members: list[str], non_members: list[str], queries_left: int, positions: int = POSITIONS):
    """As many member/non-member pairs as the service's remaining budget pays for, refusing if none."""
    pairs = min(len(members), len(non_members), queries_left // (2 * positions))
    if pairs < 10:
        raise PrivtuneError(
            f"the service has {queries_left} queries left: an API attack needs at least {20 * positions} "
            f"({positions} per record, 10 member and 10 non-member records)"
        )
    return members[:pairs], non_members[:pairs]


def service_claim(status: dict) -> Claim:
    return Claim(
        float(status["epsilon"]),
        float(status["delta"]),
        f"PMixED ({status['epsilon']:g}, {status['delta']:g}) per member's data over all {status['queries_total']} "
        "queries",
    )
