"""Rényi DP to (ε, δ)-DP and back: the one conversion every accountant and ledger uses.

Balle et al. 2020 ("Hypothesis testing interpretations and Rényi differential privacy", Thm 21):
(α, r)-RDP implies (r + ln((α-1)/α) - (ln δ + ln α)/(α-1), δ)-DP. It is tighter than Mironov 2017
(Prop. 3), r + ln(1/δ)/(α-1).
"""

from __future__ import annotations

import math

from privtune.common.errors import PrivtuneError


def check_conversion(delta: float, alpha: float) -> None:
    """Refuse a δ or an order for which the conversion is undefined (NaN and infinity included)."""
    if not (math.isfinite(alpha) and alpha > 1):
        raise PrivtuneError(f"the Rényi order alpha must be a finite number > 1, got {alpha}")
    if not 0 < delta < 1:
        raise PrivtuneError(f"delta must be in (0, 1), got {delta}")


def _slack(delta: float, alpha: float) -> float:
    """What the conversion adds to the RDP: ln((α-1)/α) - (ln δ + ln α)/(α-1)."""
    check_conversion(delta, alpha)
    return math.log((alpha - 1.0) / alpha) - (math.log(delta) + math.log(alpha)) / (alpha - 1.0)


def rdp_to_epsilon(rdp: float, delta: float, alpha: float) -> float:
    """ε of the (ε, δ)-DP that a total RDP of ``rdp`` at order ``alpha`` implies, never below 0.

    RDP 0 means identical output laws, which is (0, 0)-DP; the conversion's slack would otherwise
    show a positive ε for a mechanism that released nothing.
    """
    if not (math.isfinite(rdp) and rdp >= 0):
        raise PrivtuneError(f"an RDP total must be a finite number >= 0, got {rdp}")
    if rdp == 0:
        return 0.0
    return max(0.0, rdp + _slack(delta, alpha))


def epsilon_to_rdp(epsilon: float, delta: float, alpha: float) -> float:
    """The total RDP at order ``alpha`` whose conversion is exactly (``epsilon``, ``delta``)-DP (may be <= 0)."""
    if not (math.isfinite(epsilon) and epsilon >= 0):
        raise PrivtuneError(f"epsilon must be a finite number >= 0, got {epsilon}")
    return epsilon - _slack(delta, alpha)
