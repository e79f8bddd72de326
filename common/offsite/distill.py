"""Emulator distillation on the model owner's public text.

A layer-dropped middle is useless on small models (SmolLM2 2-8-2: LM loss 11.0, worse than
uniform), so the model owner trains the kept middle blocks to stand in for the full middle section:

    loss = lm_weight * LM(emulator) + kd_weight * KD + logit_kd_weight * KL(full || emulator)

with KD = mean(((h_T - h_S) / rms(h_T))^2) on the hidden state leaving the middle section (rms(h_T)
one scalar over the batch, as in the offsite-tuning code) and the KL on the LM head's next-token
distributions. Teacher (full model) and student (emulator) share their frozen bottom adapter blocks,
so both middles see the same input. Without logit KD the teacher's forward stops at its last middle
block: its top blocks and LM head (a fifth of a forward on a 49k vocabulary) never run.

``middle_lora_r > 0`` trains low-rank updates of the middle blocks' weight matrices instead of the
matrices themselves, merged into the weights at the end: the emulator stays a plain model.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from privtune.common.checkpoint import load_checkpoint, save_checkpoint
from privtune.common.errors import PrivtuneError
from privtune.common.families import get_blocks
from privtune.common.offsite.adapter import linear_layers
from privtune.common.offsite.lm import forward_logits, next_token_nll
from privtune.common.offsite.split import SplitIndices, split_of
from privtune.common.offsite.train import autocast, check_loop_settings, shuffled_batches

CHECKPOINT_FORMAT = "privtune-distill/2"
LOSS_NAMES = ("lm", "kd", "logit_kd")


@dataclass(frozen=True)
class DistillConfig:
    steps: int = 200
    batch_size: int = 4
    lr: float = 1e-4
    lm_weight: float = 1.0
    kd_weight: float = 30.0
    logit_kd_weight: float = 0.0
    middle_lora_r: int = 0
    warmup_steps: int = 0
    dtype: str = "fp32"
    seed: int = 0
    checkpoint_every: int = 50
    log_every: int = 10

    def __post_init__(self) -> None:
        check_loop_settings("distillation", self.dtype, self.steps, self.batch_size, self.lr, self.checkpoint_every)
        if min(self.lm_weight, self.kd_weight, self.logit_kd_weight) < 0 or self.middle_lora_r < 0:
            raise PrivtuneError(
                "distillation loss weights and middle_lora_r must be >= 0, got "
                f"lm={self.lm_weight}, kd={self.kd_weight}, logit_kd={self.logit_kd_weight}, r={self.middle_lora_r}"
            )

    def fingerprint(self) -> dict[str, Any]:
        """The settings a resumed run must share (not how often it logs or saves)."""
        return {k: v for k, v in asdict(self).items() if k not in ("checkpoint_every", "log_every")}


def alignment_config(main: DistillConfig, steps: int, logit_kd_weight: float = 1.0) -> DistillConfig:
    """The stage that follows ``main``: knowledge distillation alone (hidden state and logits).

    The LM term fits the emulator to the public corpus itself; without it the middle only learns to
    reproduce the full model, which carries to text unlike that corpus. Its own warmup and cosine, and
    a data order that does not replay the main stage's.
    """
    return replace(
        main,
        steps=steps,
        warmup_steps=max(1, steps // 10),
        lm_weight=0.0,
        logit_kd_weight=logit_kd_weight,
        seed=main.seed + main.steps,
    )


@dataclass
class DistillResult:
    steps: int
    resumed_from: int
    lm_losses: list[float] = field(default_factory=list)
    kd_losses: list[float] = field(default_factory=list)
    logit_kd_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    history: list[list[float]] = field(default_factory=list)
    """Per-step [lm, kd, logit_kd] of the whole run, resumed parts included (for the loss curve)."""


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


def logit_kd_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student) between next-token distributions, in fp32."""
    vocab = teacher_logits.shape[-1]
    teacher = F.log_softmax(teacher_logits.reshape(-1, vocab).float(), dim=-1)
    student = F.log_softmax(student_logits.reshape(-1, vocab).float(), dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean")


def _middle_ends(full_model: nn.Module, emulator: nn.Module) -> tuple[SplitIndices, nn.Module, nn.Module]:
    split = split_of(emulator)
    if split is None:
        raise PrivtuneError("distillation needs an emulator built with build_emulator_model")
    teacher_block = get_blocks(full_model)[split.middle_kept[-1]]
    student_block = get_blocks(emulator)[len(split.bottom) + len(split.middle_kept) - 1]
    return split, teacher_block, student_block


def _teacher(
    full_model: nn.Module, teacher_block: nn.Module, batch: torch.Tensor, logits: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The full model's hidden state after its middle, and its logits when ``logits``."""
    out = None
    with torch.no_grad(), _capture_output(teacher_block, stop=not logits) as captured:
        if logits:
            out = forward_logits(full_model, batch)
        else:
            with contextlib.suppress(_StopForward):
                forward_logits(full_model, batch)
    return captured["hidden"], out


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
            teacher_hidden, _ = _teacher(full_model, teacher_block, batch, logits=False)
            losses.append(kd_loss(teacher_hidden, captured["hidden"]).item())
    finally:
        full_model.train(modes[0])
        emulator.train(modes[1])
    return sum(losses) / len(losses)


def _middle_blocks(emulator: nn.Module, split: SplitIndices) -> dict[int, nn.Module]:
    blocks = get_blocks(emulator)
    return {pos: blocks[pos] for pos in range(len(split.bottom), len(split.bottom) + len(split.middle_kept))}


class _LowRankUpdate(nn.Module):
    """weight + scale * B @ A, shaped like the weight (nn.Linear and GPT-2's transposed Conv1D alike)."""

    def __init__(self, weight: torch.Tensor, r: int, generator: torch.Generator) -> None:
        super().__init__()
        rows, cols = weight.shape
        init = torch.randn(r, cols, generator=generator, dtype=torch.float32) / math.sqrt(cols)
        self.a = nn.Parameter(init.to(weight.dtype))
        self.b = nn.Parameter(torch.zeros(rows, r, dtype=weight.dtype))
        self.scale = 2.0  # alpha = 2r, the adapters' default ratio

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.scale * (self.b @ self.a)


@contextlib.contextmanager
def _middle_lora(middle: dict[int, nn.Module], r: int, seed: int) -> Iterator[None]:
    """Low-rank updates on the middle blocks' matrices, merged into the weights on exit."""
    generator = torch.Generator().manual_seed(seed)
    layers = [layer for block in middle.values() for layer in linear_layers(block).values()]
    for layer in layers:
        parametrize.register_parametrization(layer, "weight", _LowRankUpdate(layer.weight, r, generator))
    try:
        yield
    finally:
        for layer in layers:
            parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)


def _trainable(middle: dict[int, nn.Module], lora: bool) -> dict[str, nn.Parameter]:
    params = {}
    for pos, block in middle.items():
        for name, p in block.named_parameters():
            if not lora or ("parametrizations" in name and name.endswith((".a", ".b"))):
                params[f"{pos}.{name}"] = p
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

    With ``checkpoint`` (a folder, see :mod:`privtune.common.checkpoint`), state (trainable weights,
    optimizer, schedule, RNG, loss history) is saved every ``cfg.checkpoint_every`` steps and at the
    end, and a later call with the same arguments resumes where it stopped, reproducing the
    uninterrupted run. ``on_step(step, {"lm", "kd", "logit_kd"})`` is called after each step (and after
    its checkpoint).
    """
    split, teacher_block, student_block = _middle_ends(full_model, emulator)
    middle = _middle_blocks(emulator, split)
    flags = {p: p.requires_grad for p in emulator.parameters()}
    modes = full_model.training, emulator.training
    try:
        for p in emulator.parameters():
            p.requires_grad_(False)
        lora = _middle_lora(middle, cfg.middle_lora_r, cfg.seed) if cfg.middle_lora_r else contextlib.nullcontext()
        with lora:
            trainable = _trainable(middle, lora=cfg.middle_lora_r > 0)
            for p in trainable.values():
                p.requires_grad_(True)
            full_model.eval()
            emulator.train()
            ends = (teacher_block, student_block)
            return _run(full_model, emulator, blocks, cfg, split, ends, trainable, checkpoint, progress, on_step)
    finally:
        full_model.train(modes[0])
        emulator.train(modes[1])
        for p, flag in flags.items():
            p.requires_grad_(flag)


def _run(
    full_model: nn.Module,
    emulator: nn.Module,
    blocks: torch.Tensor,
    cfg: DistillConfig,
    split: SplitIndices,
    ends: tuple[nn.Module, nn.Module],
    trainable: dict[str, nn.Parameter],
    checkpoint: Path | str | None,
    progress: bool,
    on_step: Callable[[int, dict[str, float]], None] | None,
) -> DistillResult:
    teacher_block, student_block = ends
    fingerprint = {"split": split.to_dict(), "config": cfg.fingerprint(), "blocks": list(blocks.shape)}
    optimizer = torch.optim.AdamW(list(trainable.values()), lr=cfg.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _cosine(s, cfg.steps, cfg.warmup_steps))
    history: list[list[float]] = []
    start_step = 0
    if checkpoint is not None:
        found = load_checkpoint(checkpoint, CHECKPOINT_FORMAT, fingerprint, "distillation")
        if found is not None:
            with torch.no_grad():
                for name, p in trainable.items():
                    p.copy_(found.state["trainable"][name])
            optimizer.load_state_dict(found.state["optimizer"])
            scheduler.load_state_dict(found.state["scheduler"])
            torch.set_rng_state(found.state["rng"])
            history = found.state["history"].tolist()
            start_step = found.step
    result = DistillResult(steps=start_step, resumed_from=start_step, history=history)
    batches = shuffled_batches(blocks, cfg.batch_size, cfg.seed, start_step)
    with_logits = cfg.logit_kd_weight > 0
    began = time.perf_counter()
    bar = tqdm(total=cfg.steps, initial=start_step, desc="distill", unit="step", disable=not progress)
    try:
        for step in range(start_step, cfg.steps):
            batch = next(batches)
            teacher_hidden, teacher_logits = _teacher(full_model, teacher_block, batch, with_logits)
            optimizer.zero_grad(set_to_none=True)
            with autocast(cfg.dtype), _capture_output(student_block, stop=False) as captured:
                logits = forward_logits(emulator, batch)
            lm = next_token_nll(logits, batch)
            kd = kd_loss(teacher_hidden, captured["hidden"])
            logit_kd = logit_kd_loss(teacher_logits, logits) if teacher_logits is not None else torch.zeros(())
            (cfg.lm_weight * lm + cfg.kd_weight * kd + cfg.logit_kd_weight * logit_kd).backward()
            optimizer.step()
            scheduler.step()
            losses = {"lm": lm.item(), "kd": kd.item(), "logit_kd": logit_kd.item()}
            result.lm_losses.append(losses["lm"])
            result.kd_losses.append(losses["kd"])
            result.logit_kd_losses.append(losses["logit_kd"])
            result.history.append([losses[name] for name in LOSS_NAMES])
            result.steps = step + 1
            bar.update(1)
            if (step + 1) % max(cfg.log_every, 1) == 0:
                bar.set_postfix({name: f"{value:.4f}" for name, value in losses.items()})
            if checkpoint is not None and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps):
                state = {
                    "trainable": {name: p.detach().clone() for name, p in trainable.items()},
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "rng": torch.get_rng_state(),
                    "history": torch.tensor(result.history, dtype=torch.float64).reshape(-1, len(LOSS_NAMES)),
                }
                save_checkpoint(checkpoint, CHECKPOINT_FORMAT, step + 1, fingerprint, state)
            if on_step is not None:
                on_step(step + 1, losses)
    finally:
        bar.close()
        result.seconds = time.perf_counter() - began
    return result


def middle_state(emulator: nn.Module) -> dict[str, torch.Tensor]:
    """The kept middle blocks' tensors (all that distillation changes), keyed ``"<block>.<name>"``."""
    split = split_of(emulator)
    if split is None:
        raise PrivtuneError("middle_state needs an emulator built with build_emulator_model")
    return {
        f"{pos}.{name}": t.detach().clone().contiguous()
        for pos, block in _middle_blocks(emulator, split).items()
        for name, t in block.state_dict().items()
    }


def load_middle_state(emulator: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Put :func:`middle_state`'s tensors back into an emulator of the same split."""
    blocks = get_blocks(emulator)
    by_block: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        position, name = key.split(".", 1)
        by_block.setdefault(int(position), {})[name] = tensor
    for pos, block_state in by_block.items():
        blocks[pos].load_state_dict(block_state)
