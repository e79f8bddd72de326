"""The data owner's training loop over whatever parameters of a model are trainable.

One loop serves plain training (AdamW, shuffled blocks), full fine-tuning as a reference, and DP-SGD:
the DP helper passes Opacus' wrapped model, its ``DPOptimizer`` as ``optimizer`` and batches from its
Poisson ``DPDataLoader`` as ``batches``, and the loop stays the same.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import secrets
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn
from tqdm.auto import tqdm

from privtune.common.errors import PrivtuneError
from privtune.common.offsite.lm import HEAD_CHUNK, lean_lm_loss, lm_loss, recompute_blocks, supports_lean
from privtune.common.tokens import TokenRows

DTYPES = ("fp32", "bf16")
Rows = TypeVar("Rows", torch.Tensor, TokenRows)


def check_loop_settings(
    what: str, dtype: str, steps: int, batch_size: int, lr: float, checkpoint_every: int = 1
) -> None:
    """The settings every training loop here shares (adapter training, distillation, pretraining)."""
    if dtype not in DTYPES:
        raise PrivtuneError(f"{what} dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if steps < 0 or batch_size < 1 or lr <= 0 or checkpoint_every < 1:
        raise PrivtuneError(
            f"{what} needs steps >= 0, batch_size >= 1, lr > 0 and checkpoint_every >= 1; got "
            f"steps={steps}, batch_size={batch_size}, lr={lr}, checkpoint_every={checkpoint_every}"
        )


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 100
    batch_size: int = 8
    lr: float = 1e-3
    dtype: str = "fp32"
    seed: int | None = None
    log_every: int = 10
    weight_decay: float = 0.0
    lean: bool = True
    """Chunked LM head and recomputed frozen blocks (:func:`lean_lm_loss`) where the model allows it."""
    head_chunk: int = HEAD_CHUNK
    """Tokens per LM-head chunk of the lean loss: fewer hold less memory, more launch fewer kernels."""
    gradient_checkpointing: bool = False
    """Recompute the trainable blocks in the backward too: their activations are then the only ones kept
    per block besides its input, for a longer forward; gradients are the same."""

    def __post_init__(self) -> None:
        check_loop_settings("training", self.dtype, self.steps, self.batch_size, self.lr)
        if self.head_chunk < 1:
            raise PrivtuneError(f"training: head_chunk must be at least 1 token, got {self.head_chunk}")


@dataclass(frozen=True)
class TrainResult:
    mean_loss: float
    last_loss: float
    steps: int
    tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")


def check_converging(owner: str, losses: list[float]) -> None:
    """Stop a round whose loss went non-finite: its update would carry NaN/inf weights to the server."""
    bad = [loss for loss in losses if not math.isfinite(loss)]
    if bad:
        raise PrivtuneError(f"{owner}: training diverged (loss {bad[0]}); lower learning-rate")


def autocast(dtype: str) -> contextlib.AbstractContextManager:
    """bf16 mixed precision on CPU (weights stay fp32), or nothing for fp32."""
    if dtype == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def shuffled_batches(blocks: Rows, batch_size: int, seed: int, start_step: int = 0) -> Iterator[Rows]:
    """Endless batches, each epoch a fresh permutation; batch ``s`` depends only on (seed, s).

    That makes a resumed run see exactly the batches an uninterrupted one would.
    """
    n = len(blocks)
    position = start_step * batch_size
    epoch, offset = divmod(position, n)
    pending: list[torch.Tensor] = []
    while True:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(_epoch_seed(seed, epoch)))[offset:]
        pending.append(order)
        offset, epoch = 0, epoch + 1
        available = torch.cat(pending)
        while len(available) >= batch_size:
            yield blocks[available[:batch_size]]
            available = available[batch_size:]
        pending = [available]


def _epoch_seed(seed: int, epoch: int) -> int:
    digest = hashlib.sha256(f"{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise PrivtuneError("the model has no trainable parameters; prepare an adapter first")
    return params


def checkpointed_adapter_blocks(model: nn.Module) -> contextlib.AbstractContextManager[int]:
    """Gradient checkpointing of the blocks that train, refused where per-example hooks would see them twice.

    Opacus (DP-SGD) wraps the model and records each layer's input in a forward hook; a recomputed
    block runs its layers a second time in the backward, so the hooks would pair gradients with the
    wrong (or an extra) activation and the per-example clipping would no longer be what is charged.
    """
    if not supports_lean(model):
        raise PrivtuneError(
            f"gradient checkpointing needs a Hugging Face causal LM, got {type(model).__name__}: under DP-SGD "
            "Opacus' per-example gradient hooks must see each layer run once per step; turn off "
            "gradient-checkpointing or DP-SGD"
        )
    return recompute_blocks(model, frozen=False)


def train_adapter(
    model: nn.Module,
    blocks: torch.Tensor | TokenRows,
    cfg: TrainConfig,
    optimizer_factory: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None,
    progress: bool = True,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    batches: Iterable[torch.Tensor | TokenRows] | None = None,
) -> TrainResult:
    """Train the model's trainable parameters for ``cfg.steps`` steps on next-token loss.

    ``blocks`` are id rows, every position a target, or :class:`TokenRows` whose labels say which
    positions are (an instruction's response only): one loop for both.
    Defaults: AdamW(lr, weight_decay) over trainable parameters and shuffled batches of ``blocks``.
    ``optimizer_factory`` replaces the optimizer's construction; ``optimizer`` (already built) and
    ``batches`` (any iterable of ``[B, T]`` id tensors or TokenRows, or of 1-tuples as a DataLoader
    yields) replace the optimizer and the data outright.
    """
    rows = TokenRows.of(blocks)
    if rows.ids.dim() != 2 or len(rows) == 0:
        raise PrivtuneError(
            f"training data must be a non-empty [n_blocks, block_size] tensor, got shape {list(rows.shape)}"
        )
    if optimizer is None:
        params = trainable_parameters(model)
        optimizer = (
            optimizer_factory(params)
            if optimizer_factory
            else torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        )
    if batches is None:
        seed = cfg.seed if cfg.seed is not None else secrets.randbits(62)
        batches = shuffled_batches(rows, cfg.batch_size, seed)
    stream = iter(batches)
    lean = cfg.lean and supports_lean(model)
    loss_of = functools.partial(lean_lm_loss, chunk=cfg.head_chunk) if lean else lm_loss
    recomputed = contextlib.ExitStack()
    if cfg.gradient_checkpointing:
        recomputed.enter_context(checkpointed_adapter_blocks(model))
    was_training = model.training
    model.train()
    losses: list[float] = []
    tokens = 0
    start = time.perf_counter()
    bar = tqdm(total=cfg.steps, desc="train", unit="step", disable=not progress, leave=False)
    try:
        for step in range(cfg.steps):
            batch = next(stream)
            if isinstance(batch, (tuple, list)):
                batch = batch[0]
            batch = TokenRows.of(batch)
            optimizer.zero_grad(set_to_none=True)
            with autocast(cfg.dtype):
                loss = loss_of(model, batch.ids, labels=batch.labels)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            tokens += batch.ids.numel()
            bar.update(1)
            if (step + 1) % max(cfg.log_every, 1) == 0:
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
    finally:
        bar.close()
        recomputed.close()
        model.train(was_training)
    seconds = time.perf_counter() - start
    if not losses:
        return TrainResult(float("nan"), float("nan"), 0, 0, seconds)
    return TrainResult(sum(losses) / len(losses), losses[-1], len(losses), tokens, seconds)
