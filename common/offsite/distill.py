"""Emulator distillation on the model owner's public text.

A layer-dropped middle is useless on small models (SmolLM2 2-8-2: LM loss 11.0, worse than
uniform), so the model owner trains the kept middle blocks to reproduce the full middle section:
loss = lm_weight * LM(emulator) + kd_weight * KD, with KD = mean(((h_T - h_S) / rms(h_T))^2) on the
hidden state leaving the middle section. Teacher (full model) and student (emulator) share their
frozen bottom adapter blocks, so both middles see the same input. As in the original code, rms(h_T)
is one scalar over the whole batch. The teacher's forward stops at its last middle block: its top
blocks and LM head (a fifth of a forward on a 49k vocabulary) are never run.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from privtune.common.errors import PrivtuneError
from privtune.common.families import get_blocks
from privtune.common.offsite.lm import forward_logits, next_token_nll
from privtune.common.offsite.split import SplitIndices, split_of
from privtune.common.offsite.train import autocast, check_loop_settings, shuffled_batches

CHECKPOINT_FORMAT = "privtune-distill/1"


@dataclass(frozen=True)
class DistillConfig:
    steps: int = 200
    batch_size: int = 4
    lr: float = 1e-4
    lm_weight: float = 1.0
    kd_weight: float = 30.0
    warmup_steps: int = 0
    dtype: str = "fp32"
    seed: int = 0
    checkpoint_every: int = 50
    log_every: int = 10

    def __post_init__(self) -> None:
        check_loop_settings("distillation", self.dtype, self.steps, self.batch_size, self.lr, self.checkpoint_every)


@dataclass
class DistillResult:
    steps: int
    resumed_from: int
    lm_losses: list[float] = field(default_factory=list)
    kd_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


class _StopForward(Exception):
    """Raised by a hook once the teacher's middle output is captured; the rest of its forward is skipped."""


@contextlib.contextmanager
def _capture_output(block: nn.Module, stop: bool) -> Iterator[dict[str, torch.Tensor]]:
    store: dict[str, torch.Tensor] = {}

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        store["hidden"] = output[0] if isinstance(output, tuple) else output
        if stop:
            raise _StopForward

    handle = block.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


def kd_loss(teacher_hidden: torch.Tensor, student_hidden: torch.Tensor) -> torch.Tensor:
    teacher = teacher_hidden.float()
    rms = teacher.pow(2).mean().sqrt()
    return ((teacher - student_hidden.float()) / rms).pow(2).mean()


def _middle_ends(full_model: nn.Module, emulator: nn.Module) -> tuple[SplitIndices, nn.Module, nn.Module]:
    split = split_of(emulator)
    if split is None:
        raise PrivtuneError("distillation needs an emulator built with build_emulator_model")
    teacher_block = get_blocks(full_model)[split.middle_kept[-1]]
    student_block = get_blocks(emulator)[len(split.bottom) + len(split.middle_kept) - 1]
    return split, teacher_block, student_block


def _teacher_hidden(full_model: nn.Module, teacher_block: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), _capture_output(teacher_block, stop=True) as captured, contextlib.suppress(_StopForward):
        forward_logits(full_model, batch)
    return captured["hidden"]


@torch.no_grad()
def middle_kd(full_model: nn.Module, emulator: nn.Module, blocks: torch.Tensor, batch_size: int = 4) -> float:
    """Mean KD loss of the emulator's middle against the full model's, over ``blocks`` (eval mode)."""
    _, teacher_block, student_block = _middle_ends(full_model, emulator)
    modes = full_model.training, emulator.training
    full_model.eval()
    emulator.eval()
    losses = []
    try:
        for start in range(0, len(blocks), batch_size):
            batch = blocks[start : start + batch_size]
            with _capture_output(student_block, stop=True) as captured, contextlib.suppress(_StopForward):
                forward_logits(emulator, batch)
            losses.append(kd_loss(_teacher_hidden(full_model, teacher_block, batch), captured["hidden"]).item())
    finally:
        full_model.train(modes[0])
        emulator.train(modes[1])
    return sum(losses) / len(losses)


def _middle_parameters(emulator: nn.Module, split: SplitIndices) -> dict[str, nn.Parameter]:
    blocks = get_blocks(emulator)
    params = {}
    for pos in range(len(split.bottom), len(split.bottom) + len(split.middle_kept)):
        params.update({f"{pos}.{name}": p for name, p in blocks[pos].named_parameters()})
    return params


def _cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def distill_emulator(
    full_model: nn.Module,
    emulator: nn.Module,
    blocks: torch.Tensor,
    cfg: DistillConfig,
    *,
    checkpoint: Path | str | None = None,
    progress: bool = True,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> DistillResult:
    """Train the emulator's kept middle blocks in place; only they change.

    With ``checkpoint``, state (middle weights, optimizer, schedule, RNG) is saved every
    ``cfg.checkpoint_every`` steps and at the end, and a later call with the same arguments resumes
    where it stopped, reproducing the uninterrupted run. ``on_step(step, {"lm", "kd"})`` is called
    after each step (and after its checkpoint).
    """
    split, teacher_block, student_block = _middle_ends(full_model, emulator)
    middle = _middle_parameters(emulator, split)
    fingerprint = {
        "split": split.to_dict(),
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("checkpoint_every", "log_every")},
        "blocks": list(blocks.shape),
    }
    flags = {p: p.requires_grad for p in emulator.parameters()}
    for p in emulator.parameters():
        p.requires_grad_(False)
    for p in middle.values():
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(list(middle.values()), lr=cfg.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _cosine(s, cfg.steps, cfg.warmup_steps))
    path = Path(checkpoint) if checkpoint is not None else None
    start_step = _resume(path, fingerprint, middle, optimizer, scheduler) if path and path.exists() else 0
    result = DistillResult(steps=start_step, resumed_from=start_step)
    batches = shuffled_batches(blocks, cfg.batch_size, cfg.seed, start_step)
    modes = full_model.training, emulator.training
    full_model.eval()
    emulator.train()
    began = time.perf_counter()
    bar = tqdm(total=cfg.steps, initial=start_step, desc="distill", unit="step", disable=not progress)
    try:
        for step in range(start_step, cfg.steps):
            batch = next(batches)
            teacher_hidden = _teacher_hidden(full_model, teacher_block, batch)
            optimizer.zero_grad(set_to_none=True)
            with autocast(cfg.dtype), _capture_output(student_block, stop=False) as captured:
                logits = forward_logits(emulator, batch)
            lm = next_token_nll(logits, batch)
            kd = kd_loss(teacher_hidden, captured["hidden"])
            (cfg.lm_weight * lm + cfg.kd_weight * kd).backward()
            optimizer.step()
            scheduler.step()
            result.lm_losses.append(lm.item())
            result.kd_losses.append(kd.item())
            result.steps = step + 1
            bar.update(1)
            if (step + 1) % max(cfg.log_every, 1) == 0:
                bar.set_postfix(lm=f"{lm.item():.3f}", kd=f"{kd.item():.4f}")
            if path and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps):
                _save(path, step + 1, fingerprint, middle, optimizer, scheduler)
            if on_step is not None:
                on_step(step + 1, {"lm": lm.item(), "kd": kd.item()})
    finally:
        bar.close()
        result.seconds = time.perf_counter() - began
        full_model.train(modes[0])
        emulator.train(modes[1])
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return result


def _save(
    path: Path,
    step: int,
    fingerprint: dict,
    middle: dict[str, nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
) -> None:
    state = {
        "format": CHECKPOINT_FORMAT,
        "step": step,
        "fingerprint": fingerprint,
        "middle": {name: p.detach().clone() for name, p in middle.items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": torch.get_rng_state(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _resume(
    path: Path, fingerprint: dict, middle: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer, scheduler: Any
) -> int:
    try:
        state = torch.load(path, weights_only=True)
    except Exception as err:  # torch raises several unrelated types for a damaged file
        raise PrivtuneError(
            f"distillation checkpoint {path} is unreadable ({type(err).__name__}); delete it to start over"
        ) from None
    if state.get("format") != CHECKPOINT_FORMAT or state.get("fingerprint") != fingerprint:
        raise PrivtuneError(
            f"distillation checkpoint {path} was made for another model, split, data or settings; "
            "delete it to start over, or rerun with the original settings"
        )
    with torch.no_grad():
        for name, p in middle.items():
            p.copy_(state["middle"][name])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    return int(state["step"])
