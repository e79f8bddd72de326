"""Next-token loss on packed blocks, shared by adapter training, distillation and evaluation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def forward_logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits for a batch of blocks.

    ``position_ids`` are passed expanded to the batch: Opacus' per-example gradients need every
    input to carry the batch dimension (GPT-2 otherwise broadcasts a [1, T] tensor).
    """
    batch, length = input_ids.shape
    position_ids = torch.arange(length, device=input_ids.device).unsqueeze(0).expand(batch, length)
    return model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits


def next_token_nll(logits: torch.Tensor, input_ids: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of each token given the ones before it (in fp32, whatever the logits' dtype)."""
    vocab = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(), input_ids[:, 1:].reshape(-1), reduction=reduction)


def lm_loss(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    return next_token_nll(forward_logits(model, input_ids), input_ids)
