"""The one RDP-to-(ε, δ) conversion: Balle et al. 2020, Thm 21, and its inverse."""

import math

import pytest

from privtune.common.errors import PrivtuneError
from privtune.common.privacy.rdp import epsilon_to_rdp, rdp_to_epsilon


def test_conversion_is_balle_et_al_2020_and_inverts():
    alpha, delta = 3.0, 1e-5
    expected = 8 - math.log(2 / 3) + (math.log(1e-5) + math.log(3)) / 2
    assert epsilon_to_rdp(8.0, delta, alpha) == pytest.approx(expected, rel=1e-15)
    assert rdp_to_epsilon(epsilon_to_rdp(8.0, delta, alpha), delta, alpha) == pytest.approx(8.0, rel=1e-14)
    for rdp in (0.5, 3.0, 10.0):  # tighter than Mironov 2017
        assert rdp_to_epsilon(rdp, delta, alpha) < rdp + math.log(1 / delta) / (alpha - 1)


def test_nothing_spent_is_zero_epsilon_and_small_rdp_never_negative():
    assert rdp_to_epsilon(0.0, 1e-5, 3.0) == 0.0
    assert rdp_to_epsilon(1e-12, 0.5, 1000.0) == 0.0  # the slack is negative here: clamped


@pytest.mark.parametrize(
    "rdp, delta, alpha",
    [(math.nan, 1e-5, 3.0), (math.inf, 1e-5, 3.0), (-1.0, 1e-5, 3.0), (1.0, 1e-5, math.inf), (1.0, 1e-5, math.nan)]
    + [(1.0, 1e-5, 1.0), (1.0, 0.0, 3.0), (1.0, math.nan, 3.0), (1.0, 1.0, 3.0)],
)
def test_undefined_inputs_are_refused(rdp, delta, alpha):
    with pytest.raises(PrivtuneError):
        rdp_to_epsilon(rdp, delta, alpha)
