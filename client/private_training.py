"""DP-SGD for a data owner's adapter round, with the owner's own ledger and budget.

The noise multiplier is solved once for the whole run (``dp-epsilon`` reached after all planned
rounds of ``local-steps``), so every round adds the same noise and the accountant's cumulative
epsilon reaches the target exactly at the last round. The owner's ledger budget (``dp-budget`` in
node config) is checked before training: a round that would exceed it is declined, not run.
"""

from __future__ import annotations

import math
import time

import torch

from privtune.client.site import SiteConfig
from privtune.common.dpsgd import DpSgdConfig, train_round
from privtune.common.federation.config import FederationConfig
from privtune.common.ledger import Ledger
from privtune.common.offsite.train import TrainConfig, TrainResult, trainable_parameters


def train_with_dpsgd(
    model: torch.nn.Module, blocks: torch.Tensor, train_cfg: TrainConfig, site: SiteConfig, cfg: FederationConfig
) -> tuple[TrainResult, dict[str, float]]:
    ledger = Ledger(site.ledger_path, site.owner)
    if ledger.budget("dpsgd") is None:
        ledger.set_budget("dpsgd", site.dp_budget, delta=cfg.dp_delta)
    dp_cfg = DpSgdConfig(
        max_grad_norm=cfg.dp_max_grad_norm,
        delta=cfg.dp_delta,
        target_epsilon=cfg.dp_epsilon,
        total_steps=cfg.num_server_rounds * cfg.local_steps,
    )
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=train_cfg.lr)
    start = time.perf_counter()
    result = train_round(
        model,
        optimizer,
        blocks,
        batch_size=train_cfg.batch_size,
        steps=train_cfg.steps,
        config=dp_cfg,
        ledger=ledger,
        seed=train_cfg.seed,
    )
    seconds = time.perf_counter() - start
    losses = result.losses or [math.nan]
    summary = TrainResult(
        mean_loss=sum(losses) / len(losses),
        last_loss=losses[-1],
        steps=train_cfg.steps,
        tokens=int(train_cfg.steps * train_cfg.batch_size * blocks.shape[1]),
        seconds=seconds,
    )
    return summary, {"dp-epsilon": result.epsilon, "dp-noise-multiplier": result.plan.noise_multiplier}
