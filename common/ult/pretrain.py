"""Model owner: make a causal LM ULT-ready and continue pretraining it on ULT-encoded public text.

A ULT id means nothing in the model's own vocabulary (id 40 is a ranked BWT run, not the token the
tokenizer numbered 40), so every row of the input embedding and of an untied LM head is
re-initialised, not only rows past the old vocabulary: each row is drawn around the old rows' mean
with their per-dimension spread (times ``noise``). The blocks thus see inputs of the scale they were
trained on, and ids are distinguishable from the first step; on the tiny test model, rows at a tenth
of the spread took several times more steps to start learning.

Pretraining uses the public, unkeyed table (the model owner never holds a federation key); a data
owner later warm-starts from it with :func:`common.ult.keys.permuted_rows`.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from privtune.common.checkpoint import load_checkpoint, save_checkpoint
from privtune.common.corpus import Document, public_corpus
from privtune.common.errors import PrivtuneError
from privtune.common.offsite.lm import lm_loss
from privtune.common.offsite.train import autocast, check_loop_settings, shuffled_batches
from privtune.common.packing import pack
from privtune.common.ult.config import BOS_ID, EOS_ID, PAD_ID, UltConfig
from privtune.common.ult.tokenizer import UltTokenizer

CHECKPOINT_FORMAT = "privtune-ult-pretrain/1"


@dataclass(frozen=True)
class PretrainConfig:
    steps: int = 1000
    batch_size: int = 8
    block_size: int = 128
    lr: float = 1e-3
    dtype: str = "fp32"
    seed: int = 0
    checkpoint_every: int = 100
    log_every: int = 10

    def __post_init__(self) -> None:
        check_loop_settings("pretraining", self.dtype, self.steps, self.batch_size, self.lr, self.checkpoint_every)


@dataclass
class PretrainResult:
    steps: int
    resumed_from: int
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def resize_for_ult(model: nn.Module, config: UltConfig, noise: float = 1.0, seed: int = 0) -> nn.Module:
    """Give ``model`` (in place) an input embedding and LM head of ``config.vocab_size`` ULT ids."""
    # the transformers methods below are typed as tensors by nn.Module.__getattr__
    embedding = model.get_input_embeddings()  # type: ignore[operator]
    head = model.get_output_embeddings()  # type: ignore[operator]
    tied = head is not None and head.weight is embedding.weight
    stats = [_row_stats(embedding.weight)] + ([] if tied or head is None else [_row_stats(head.weight)])
    head_bias = None if tied or head is None or getattr(head, "bias", None) is None else head.bias.detach().mean()
    model.resize_token_embeddings(config.vocab_size, mean_resizing=False)  # type: ignore[operator]
    generator = torch.Generator().manual_seed(seed)
    matrices = [model.get_input_embeddings().weight] + (  # type: ignore[operator]
        [] if len(stats) == 1 else [model.get_output_embeddings().weight]  # type: ignore[operator]
    )
    with torch.no_grad():
        for weight, (mean, std) in zip(matrices, stats):
            weight.copy_(mean + noise * std * torch.randn(weight.shape, generator=generator))
        if head_bias is not None:
            model.get_output_embeddings().bias.fill_(head_bias)  # type: ignore[operator]
    for target in (model.config, getattr(model, "generation_config", None)):
        if target is not None:
            target.pad_token_id, target.bos_token_id, target.eos_token_id = PAD_ID, BOS_ID, EOS_ID  # type: ignore[union-attr]
    return model


def _row_stats(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows = weight.detach().float()
    return rows.mean(0), rows.std(0)


def pretrain_ult(
    model: nn.Module,
    tokenizer: UltTokenizer,
    documents: list[Document] | None,
    cfg: PretrainConfig,
    *,
    checkpoint: Path | str | None = None,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> PretrainResult:
    """Continue pretraining all of ``model`` on ``documents`` encoded by ``tokenizer``.

    ``documents=None`` means the embedded public corpus (:func:`common.corpus.public_corpus`).

    With ``checkpoint``, model, optimizer, schedule and RNG are saved every ``cfg.checkpoint_every``
    steps and at the end; a later call with the same arguments resumes where the last one stopped
    and reproduces the uninterrupted run (batches depend only on seed and step).
    """
    vocab = model.get_input_embeddings().weight.shape[0]  # type: ignore[operator]  # a transformers method
    if vocab != tokenizer.vocab_size:
        raise PrivtuneError(
            f"the model has {vocab} embedding rows but the ULT vocabulary has {tokenizer.vocab_size}; "
            "call resize_for_ult(model, table.config) first"
        )
    blocks = pack(public_corpus() if documents is None else documents, tokenizer, cfg.block_size)
    fingerprint = {
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("checkpoint_every", "log_every")},
        "table": hashlib.sha256(repr((tokenizer.table.config, tokenizer.table.symbols)).encode()).hexdigest(),
        "blocks": list(blocks.shape),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(cfg.steps, 1))
    path = Path(checkpoint) if checkpoint is not None else None
    start_step = _resume(path, fingerprint, model, optimizer, scheduler) if path else 0
    result = PretrainResult(steps=start_step, resumed_from=start_step)
    batches = shuffled_batches(blocks, cfg.batch_size, cfg.seed, start_step)
    was_training = model.training
    model.train()
    began = time.perf_counter()
    bar = tqdm(total=cfg.steps, initial=start_step, desc="ult pretrain", unit="step", disable=not progress)
    try:
        for step in range(start_step, cfg.steps):
            optimizer.zero_grad(set_to_none=True)
            with autocast(cfg.dtype):
                loss = lm_loss(model, next(batches))
            loss.backward()
            optimizer.step()
            scheduler.step()
            result.losses.append(loss.item())
            result.steps = step + 1
            bar.update(1)
            if (step + 1) % max(cfg.log_every, 1) == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
            if path and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps):
                _save(path, step + 1, fingerprint, model, optimizer, scheduler)
            if on_step is not None:
                on_step(step + 1, loss.item())
    finally:
        bar.close()
        result.seconds = time.perf_counter() - began
        model.train(was_training)
    return result


def _save(
    path: Path, step: int, fingerprint: dict, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler
) -> None:
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": torch.get_rng_state(),
    }
    save_checkpoint(path, CHECKPOINT_FORMAT, step, fingerprint, state)


def _resume(path: Path, fingerprint: dict, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler) -> int:
    found = load_checkpoint(path, CHECKPOINT_FORMAT, fingerprint, "ULT pretraining", "model, table, corpus or settings")
    if found is None:
        return 0
    model.load_state_dict(found.state["model"])
    optimizer.load_state_dict(found.state["optimizer"])
    scheduler.load_state_dict(found.state["scheduler"])
    torch.set_rng_state(found.state["rng"])
    return found.step
