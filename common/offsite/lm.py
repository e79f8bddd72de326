"""Next-token loss on packed blocks, shared by adapter training, distillation and evaluation.

Two ways to compute the training loss. :func:`lm_loss` runs the model as Hugging Face does and
materialises the whole ``batch x seq x vocab`` logit tensor (SmolLM2: 49k columns, so at batch 4 x
128 the logits, their fp32 log-softmax and their gradient each weigh 100 MB). :func:`lean_lm_loss`
gives the same value and gradients at a fraction of the memory, for training against an emulator:

- the LM head and cross-entropy run on chunks of :data:`HEAD_CHUNK` tokens, each under activation
  checkpointing, so at most one chunk's logits exist at a time, in the forward and in the backward;
- blocks without a trainable parameter (the emulator's frozen middle) keep only their input for the
  backward and recompute their inside when the gradient passes through them to the bottom adapter.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from privtune.common.families import get_blocks
from privtune.common.tokens import IGNORE

HEAD_CHUNK = 64
"""Tokens per LM-head chunk: 64 x 49k fp32 logits = 12.6 MB per tensor (logits, log-softmax, gradient).

At 256 tokens the chunk's backward alone (three such tensors) was about half of what LoRA training on
the SmolLM2 emulator adds to the loaded model's memory."""


def _positions(input_ids: torch.Tensor) -> torch.Tensor:
    """``position_ids`` expanded to the batch: Opacus' per-example gradients need every input to carry the batch
    dimension (GPT-2 otherwise broadcasts a [1, T] tensor)."""
    batch, length = input_ids.shape
    return torch.arange(length, device=input_ids.device).unsqueeze(0).expand(batch, length)


def forward_logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits for a batch of blocks."""
    return model(input_ids=input_ids, position_ids=_positions(input_ids), use_cache=False).logits


def next_token_nll(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of each target token given the ones before it (in fp32, whatever the logits' dtype).

    ``labels`` are the input ids (every position a target) or carry :data:`IGNORE` where a position
    is not one (:mod:`privtune.common.tokens`). ``mean`` is over the targets, 0 when there are none.
    """
    vocab = logits.shape[-1]
    targets = labels[:, 1:].reshape(-1)
    total = F.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(), targets, ignore_index=IGNORE, reduction="sum")
    if reduction == "sum":
        return total
    return total / (targets != IGNORE).sum().clamp(min=1)


def lm_loss(model: nn.Module, input_ids: torch.Tensor, *, labels: torch.Tensor | None = None) -> torch.Tensor:
    return next_token_nll(forward_logits(model, input_ids), input_ids if labels is None else labels)


def supports_lean(model: nn.Module) -> bool:
    """Whether ``model`` is a Hugging Face causal LM itself.

    A wrapper (Opacus' GradSampleModule) is not: its per-sample hooks must see each layer run once
    per step, which recomputation would break.
    """
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel) and model.get_output_embeddings() is not None


def final_hidden(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The hidden state the LM head reads (after the final norm), without running the head."""
    base = model.base_model  # a transformers property, typed as a tensor by nn.Module.__getattr__
    return base(input_ids=input_ids, position_ids=_positions(input_ids), use_cache=False).last_hidden_state  # type: ignore[operator]


def _chunk_nll(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def chunked_nll(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, chunk: int = HEAD_CHUNK) -> torch.Tensor:
    """Mean next-token NLL of ``head(hidden)`` over the target positions of ``labels`` (as in
    :func:`next_token_nll`) without holding more than ``chunk`` tokens' logits at once.

    The head runs on target positions only, so a prompt's tokens cost no logits. Without any target
    the loss is a zero that still reaches the trainable parameters, so the step runs as any other.
    """
    targets = labels[:, 1:].reshape(-1)
    kept = targets != IGNORE
    states = hidden[:, :-1].reshape(-1, hidden.shape[-1])[kept]
    targets = targets[kept]
    if len(targets) == 0:
        return (hidden.sum() * 0.0).float()
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, len(targets), chunk):
        piece = slice(start, start + chunk)
        total = total + checkpoint(_chunk_nll, head, states[piece], targets[piece], use_reentrant=False)
    return total / len(targets)


def is_frozen(block: nn.Module) -> bool:
    return not any(p.requires_grad for p in block.parameters())


@contextlib.contextmanager
def recompute_blocks(model: nn.Module, frozen: bool) -> Iterator[int]:
    """Within the context, the frozen blocks (``frozen=True``) or the trainable ones keep only their
    input for the backward and run their inside again when the gradient reaches them.

    Yields how many blocks are recomputed. Nothing changes in the model's state dict or modules: the
    blocks' ``forward`` is shadowed by an instance attribute and restored on exit.
    """
    chosen = [block for block in get_blocks(model) if is_frozen(block) == frozen]
    for block in chosen:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
    try:
        yield len(chosen)
    finally:
        for block in chosen:
            del block.forward


def recompute_frozen_blocks(model: nn.Module) -> contextlib.AbstractContextManager[int]:
    return recompute_blocks(model, frozen=True)


def lean_lm_loss(
    model: nn.Module, input_ids: torch.Tensor, chunk: int = HEAD_CHUNK, *, labels: torch.Tensor | None = None
) -> torch.Tensor:
    """:func:`lm_loss` for a Hugging Face model (see :func:`supports_lean`), in less memory."""
    with recompute_frozen_blocks(model):
        hidden = final_hidden(model, input_ids)
    targets = input_ids if labels is None else labels
    return chunked_nll(model.get_output_embeddings(), hidden, targets, chunk)  # type: ignore[operator]
