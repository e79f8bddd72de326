"""What an attack's scores say: ROC AUC, TPR at a fixed FPR, bootstrap intervals, and the DP limit.

For an (epsilon, delta)-DP mechanism, any membership test on the protected unit has
TPR <= e^epsilon * FPR + delta and, from the complementary test, TPR <= 1 - e^-epsilon * (1 - delta - FPR)
(Kairouz et al. 2015). A measured point above that line refutes the claimed guarantee, so the audit
flags it; the area under the line bounds the AUC of every attack.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def roc_curve(member_scores: np.ndarray, non_member_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FPR and TPR of "member if score >= t" over every threshold t (higher score = member)."""
    scores = np.concatenate([member_scores, non_member_scores])
    labels = np.concatenate([np.ones(len(member_scores)), np.zeros(len(non_member_scores))])
    order = np.argsort(-scores, kind="mergesort")
    scores, labels = scores[order], labels[order]
    distinct = np.r_[np.nonzero(np.diff(scores))[0], len(scores) - 1]
    tp = np.cumsum(labels)[distinct]
    fp = np.cumsum(1 - labels)[distinct]
    tpr = np.r_[0.0, tp / max(len(member_scores), 1)]
    fpr = np.r_[0.0, fp / max(len(non_member_scores), 1)]
    return fpr, tpr


def roc_auc(member_scores: np.ndarray, non_member_scores: np.ndarray) -> float:
    """P(score of a random member > that of a random non-member), ties counting one half."""
    m = np.asarray(member_scores, dtype=np.float64)[:, None]
    n = np.asarray(non_member_scores, dtype=np.float64)[None, :]
    return float(((m > n).sum() + 0.5 * (m == n).sum()) / (m.size * n.size))


def tpr_at_fpr(member_scores: np.ndarray, non_member_scores: np.ndarray, fpr: float) -> float:
    """The highest TPR among thresholds whose FPR does not exceed ``fpr``."""
    fprs, tprs = roc_curve(member_scores, non_member_scores)
    return float(tprs[fprs <= fpr + 1e-12].max())


REFUTE_QUANTILE = 0.5


@dataclass(frozen=True)
class Interval:
    """A statistic, its 95% bootstrap interval, and the stricter lower end used to refute a claim.

    A report checks many points against their limits; refuting only when the 0.5% quantile lies
    above a limit keeps the chance of a false alarm over a whole report near 5% (Bonferroni over
    about ten checks).
    """

    value: float
    low: float
    high: float
    floor: float

    def to_json(self) -> dict[str, float]:
        return {"value": self.value, "low": self.low, "high": self.high}


def bootstrap(
    statistic, member_scores: np.ndarray, non_member_scores: np.ndarray, rounds: int = 1000, seed: int = 0
) -> Interval:
    """The statistic with percentile bootstrap bounds (members and non-members resampled apart)."""
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(rounds):
        m = member_scores[rng.integers(0, len(member_scores), len(member_scores))]
        n = non_member_scores[rng.integers(0, len(non_member_scores), len(non_member_scores))]
        values.append(statistic(m, n))
    floor, low, high = np.percentile(values, [REFUTE_QUANTILE, 2.5, 97.5])
    return Interval(float(statistic(member_scores, non_member_scores)), float(low), float(high), float(floor))


def dp_tpr_bound(fpr: float | np.ndarray, epsilon: float, delta: float) -> np.ndarray:
    """The largest TPR any test can reach at ``fpr`` against an (epsilon, delta)-DP mechanism."""
    fpr = np.asarray(fpr, dtype=np.float64)
    if math.isinf(epsilon):
        return np.ones_like(fpr)
    direct = math.exp(epsilon) * fpr + delta
    complementary = 1.0 - math.exp(-epsilon) * (1.0 - delta - fpr)
    return np.minimum(1.0, np.minimum(direct, complementary))


def dp_auc_bound(epsilon: float, delta: float, grid: int = 200_001) -> float:
    """The largest ROC AUC any attack can reach against an (epsilon, delta)-DP mechanism."""
    fpr = np.linspace(0.0, 1.0, grid)
    return float(np.trapezoid(dp_tpr_bound(fpr, epsilon, delta), fpr))


def group_guarantee(epsilon: float, delta: float, k: int) -> tuple[float, float]:
    """(epsilon, delta)-DP for one unit gives this for any k units together (group privacy)."""
    if k < 1:
        raise ValueError(f"group size must be at least 1, got {k}")
    return k * epsilon, k * math.exp((k - 1) * epsilon) * delta
