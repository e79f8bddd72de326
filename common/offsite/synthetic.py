"""Adapters with random values, for benchmarks and tests that need distinct members without training.

LoRA's B starts at zero, so an untrained adapter changes nothing and a set of untrained members is
one model; moving every trainable value by Gaussian noise gives each seed its own member.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from privtune.common.offsite.adapter import prepare_adapter
from privtune.common.offsite.config import OffsiteConfig


def perturbed_adapter(base: nn.Module, cfg: OffsiteConfig, seed: int, scale: float) -> nn.Module:
    """A copy of ``base`` with ``cfg``'s adapter, every trainable value moved by N(0, scale^2) noise from ``seed``."""
    model = prepare_adapter(copy.deepcopy(base), cfg, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * scale)
    return model
