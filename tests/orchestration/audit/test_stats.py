import math

import numpy as np
import pytest

from privtune.audit import stats


def brute_auc(members, non_members):
    wins = sum((m > n) + 0.5 * (m == n) for m in members for n in non_members)
    return wins / (len(members) * len(non_members))


@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_pairwise_counting_with_ties(seed):
    rng = np.random.default_rng(seed)
    members, non_members = rng.integers(0, 6, 40).astype(float), rng.integers(0, 5, 30).astype(float)
    assert stats.roc_auc(members, non_members) == pytest.approx(brute_auc(members, non_members))
    fpr, tpr = stats.roc_curve(members, non_members)
    assert np.trapezoid(tpr, fpr) == pytest.approx(brute_auc(members, non_members))


def test_tpr_at_fpr_takes_the_best_threshold_within_the_fpr():
    members = np.array([10.0, 9.0, 3.0, 1.0])
    non_members = np.array([9.5] + [0.0] * 99)
    assert stats.tpr_at_fpr(members, non_members, 0.0) == 0.25  # only 10.0 beats every non-member
    assert stats.tpr_at_fpr(members, non_members, 0.01) == 1.0  # threshold 1.0 admits one false positive (9.5)
    assert stats.tpr_at_fpr(members, non_members, 1.0) == 1.0


def test_dp_limits():
    assert stats.dp_auc_bound(0.0, 0.0) == pytest.approx(0.5, abs=1e-6)
    assert stats.dp_auc_bound(math.inf, 0.0) == 1.0
    bounds = [stats.dp_auc_bound(e, 1e-5) for e in (0.5, 1, 3, 8)]
    assert bounds == sorted(bounds) and bounds[-1] < 1.0
    # pure eps: the limit curve is TPR = min(e^eps FPR, 1 - e^-eps (1 - FPR)); its area in closed form
    eps = 1.0
    knee = 1 / (1 + math.exp(eps))
    area = 0.5 * math.exp(eps) * knee**2 + (1 - knee) - 0.5 * math.exp(-eps) * (1 - knee) ** 2
    assert stats.dp_auc_bound(eps, 0.0) == pytest.approx(area, abs=1e-6)
    assert float(stats.dp_tpr_bound(0.01, 8.0, 1e-5)) == pytest.approx(1 - math.exp(-8) * (1 - 1e-5 - 0.01))
    assert float(stats.dp_tpr_bound(1e-5, 3.0, 1e-5)) == pytest.approx(math.exp(3) * 1e-5 + 1e-5)


def test_group_privacy():
    assert stats.group_guarantee(1.0, 1e-5, 1) == (1.0, 1e-5)
    eps, delta = stats.group_guarantee(1.0, 1e-5, 3)
    assert eps == 3.0 and delta == pytest.approx(3 * math.exp(2) * 1e-5)


def test_bootstrap_interval_contains_the_value_and_narrows_with_data():
    rng = np.random.default_rng(0)
    small = stats.bootstrap(stats.roc_auc, rng.normal(0.5, 1, 30), rng.normal(0, 1, 30))
    large = stats.bootstrap(stats.roc_auc, rng.normal(0.5, 1, 600), rng.normal(0, 1, 600))
    for interval in (small, large):
        assert interval.low <= interval.value <= interval.high
    assert large.high - large.low < small.high - small.low
