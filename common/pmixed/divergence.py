"""Rényi divergence between next-token distributions, in log space and float64.

Vocabulary-sized distributions from a softmax have entries far below 1e-30; forming ``P**alpha``
and ``Q**(1-alpha)`` directly overflows or loses them, so every sum here is a ``logsumexp`` over
``alpha*log P + (1-alpha)*log Q``. The batch dimensions broadcast; the last dimension is the
vocabulary.
"""

from __future__ import annotations

import numpy as np
import torch

Probs = torch.Tensor | np.ndarray


def renyi_divergence_from_logs(log_p: torch.Tensor, log_q: torch.Tensor, alpha: float) -> torch.Tensor:
    """D_alpha(P||Q) = ln(sum P^alpha Q^(1-alpha)) / (alpha-1) from log-probabilities.

    Entries with P = 0 contribute nothing (alpha > 1), even where Q = 0 as well, which would
    otherwise give ``-inf + inf = nan``. An entry with P > 0 and Q = 0 makes the divergence +inf.
    """
    if not alpha > 1:
        raise ValueError(f"Rényi order must be > 1, got {alpha}")
    terms = (alpha * log_p + (1.0 - alpha) * log_q).masked_fill(torch.isneginf(log_p), -torch.inf)
    return torch.logsumexp(terms, dim=-1) / (alpha - 1.0)


def as_distribution(probs: Probs, name: str) -> torch.Tensor:
    """Return ``probs`` as float64 and renormalised along the last dimension.

    Float32 softmax outputs sum to 1 only within ~1e-7; the projection and the accounting assume
    exact distributions, so every entry point renormalises in float64 once.
    """
    t = torch.as_tensor(probs, dtype=torch.float64)
    if t.ndim == 0:
        raise ValueError(f"{name} must have a vocabulary dimension, got a scalar")
    if not torch.isfinite(t).all() or (t < 0).any():
        raise ValueError(f"{name} must be finite and non-negative")
    total = t.sum(dim=-1, keepdim=True)
    if (total <= 0).any():
        raise ValueError(f"{name} has a row that sums to 0; it is not a distribution")
    return t / total


def renyi_divergence(p: Probs, q: Probs, alpha: float) -> torch.Tensor:
    """D_alpha(P||Q) for distributions (renormalised in float64), broadcasting over batch dims."""
    p_t = as_distribution(p, "p")
    q_t = as_distribution(q, "q")
    return renyi_divergence_from_logs(torch.log(p_t), torch.log(q_t), alpha)


def symmetric_renyi_divergence(p: Probs, q: Probs, alpha: float) -> torch.Tensor:
    """max(D_alpha(P||Q), D_alpha(Q||P)): the quantity PMixED's projection bounds."""
    log_p = torch.log(as_distribution(p, "p"))
    log_q = torch.log(as_distribution(q, "q"))
    return torch.maximum(
        renyi_divergence_from_logs(log_p, log_q, alpha), renyi_divergence_from_logs(log_q, log_p, alpha)
    )
