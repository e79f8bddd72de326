"""The model owner's side of a run: the full model, the emulator package and the evaluation data.

In raw mode the model owner evaluates plug-in perplexity on held-out public text (Milton) encoded
with the model's own tokenizer. In ULT mode it cannot encode text in the federation's keyed code
space (it never sees the key); it evaluates on an already-encoded id file that a key holder provides
(``eval-ids``: a ``[n, block]`` tensor saved with ``torch.save``) — ids only, which it cannot read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from privtune.common.corpus import public_corpus
from privtune.common.errors import PrivtuneError
from privtune.common.federation.config import FederationConfig
from privtune.common.models import load_model
from privtune.common.offsite.adapter import adapter_state
from privtune.common.offsite.config import OffsiteConfig
from privtune.common.offsite.package import EmulatorPackage
from privtune.common.packing import holdout_split, pack

MAX_EVAL_BLOCKS = 32


@dataclass
class ModelOwner:
    cfg: FederationConfig
    full_model: nn.Module
    package: EmulatorPackage
    eval_blocks: torch.Tensor | None

    @classmethod
    def prepare(cls, cfg: FederationConfig) -> ModelOwner:
        loaded = load_model(cfg.model)
        if cfg.package:
            package = EmulatorPackage.load(cfg.package)
        else:
            offsite = OffsiteConfig(
                k_bottom=cfg.k_bottom,
                k_top=cfg.k_top,
                n_emulator=cfg.n_emulator,
                adapter=cfg.adapter,
                lora_r=cfg.lora_r,
                lora_alpha=2 * cfg.lora_r,
                carry_embeddings=cfg.encoding == "ult",
            )
            package = build_package(loaded.model, loaded.tokenizer, offsite, cfg)
        if cfg.eval_ids:
            eval_blocks = load_eval_ids(Path(cfg.eval_ids))
        elif cfg.encoding == "raw":
            heldout = holdout_split(public_corpus(), 0.05).heldout
            eval_blocks = pack(heldout, loaded.tokenizer, cfg.block_size, MAX_EVAL_BLOCKS)
        else:
            eval_blocks = None
        return cls(cfg, loaded.model, package, eval_blocks)

    def initial_adapter(self) -> dict[str, torch.Tensor]:
        """The adapter every owner starts from (LoRA: the package's seeded A and zero B)."""
        return adapter_state(self.package.instantiate(seed=self.cfg.seed))


def build_package(model: nn.Module, tokenizer, offsite: OffsiteConfig, cfg: FederationConfig) -> EmulatorPackage:
    if cfg.distill_steps <= 0:
        return EmulatorPackage.build(model, offsite)
    from privtune.common.offsite.distill import DistillConfig, distill_emulator
    from privtune.common.offsite.split import build_emulator_model

    if cfg.encoding == "ult":
        raise PrivtuneError("in ULT mode distil the emulator beforehand with 'privtune prepare' and pass package=DIR")
    blocks = pack(public_corpus(), tokenizer, cfg.block_size, max_blocks=cfg.distill_steps * cfg.batch_size)
    emulator = build_emulator_model(model, offsite)
    distill_emulator(model, emulator, blocks, DistillConfig(steps=cfg.distill_steps, batch_size=cfg.batch_size))
    return EmulatorPackage.build(model, offsite, emulator=emulator)


def load_eval_ids(path: Path) -> torch.Tensor:
    try:
        blocks = torch.load(path, weights_only=True)
    except (OSError, RuntimeError, ValueError) as err:
        raise PrivtuneError(
            f"eval-ids file {path} is unreadable ({err}); save a [n, block] LongTensor with torch.save"
        ) from None
    if not isinstance(blocks, torch.Tensor) or blocks.dim() != 2 or blocks.dtype != torch.long or len(blocks) == 0:
        raise PrivtuneError(f"eval-ids file {path} must hold a non-empty [n, block] LongTensor")
    return blocks
