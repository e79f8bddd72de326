"""Membership scores from a target's token log-probabilities, and canary exposure.

- loss attack: the record's mean token log-probability (members were trained on: higher);
- Min-K% Prob (Shi et al. 2024): the mean of its k% least likely tokens, which ignores the easy
  tokens any model predicts and looks where memorisation shows;
- reference attack: the loss attack minus the public model's, which removes how predictable the
  record is anyway;
- exposure (Carlini et al. 2019): log2 |candidates| - log2 rank of the true secret among all
  candidates by likelihood, the rank estimated from a uniform sample of candidates.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable

import numpy as np

from privtune.audit.secrets import CANARY_DIGITS, Canary

MIN_K_FRACTION = 0.2
EXPOSURE_SAMPLE = 255

Scorer = Callable[[list[str]], list[np.ndarray]]


def loss_scores(logprobs: list[np.ndarray]) -> np.ndarray:
    return np.array([lp.mean() for lp in logprobs])


def min_k_scores(logprobs: list[np.ndarray], fraction: float = MIN_K_FRACTION) -> np.ndarray:
    return np.array([np.sort(lp)[: max(1, math.ceil(fraction * len(lp)))].mean() for lp in logprobs])


def random_secrets(count: int) -> list[str]:
    return ["".join(str(secrets.randbelow(10)) for _ in range(CANARY_DIGITS)) for _ in range(count)]


def exposure(score: Scorer, canary: Canary, sample: int = EXPOSURE_SAMPLE) -> float:
    """Estimated exposure of one canary, at most log2(sample + 1) (the secret outranks the whole sample)."""
    texts = [canary.text] + [Canary(s, canary.repeats).text for s in random_secrets(sample)]
    totals = np.array([lp.sum() for lp in score(texts)])
    outranking = int((totals[1:] >= totals[0]).sum())
    return float(-math.log2((outranking + 1) / (sample + 1)))
