"""Poisson subsampling of ensemble members, with a securely seeded generator.

Each member joins S independently with probability q, so S is a set (never a draw with
replacement, the original's bug) and |S| ~ Binomial(N, q), possibly empty. The privacy analysis in
``accountant`` relies on exactly this law, in particular on P(S = ∅) = (1-q)^N.
"""

from __future__ import annotations

import secrets

import numpy as np


def secure_rng(seed: int | None = None) -> np.random.Generator:
    """A numpy Generator seeded from ``secrets`` (128 bits) unless ``seed`` is given (tests only)."""
    return np.random.default_rng(secrets.randbits(128) if seed is None else seed)


def poisson_subsample(n_members: int, q: float, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of the members in S: member j is in S iff an independent U(0,1) draw < q."""
    if n_members < 0 or not 0.0 <= q <= 1.0:
        raise ValueError(f"need n_members >= 0 and 0 <= q <= 1, got {n_members}, {q}")
    return np.flatnonzero(rng.random(n_members) < q)
