"""DP-SGD for a data owner's training (federated rounds and PMixED members), with its own ledger and budget.

The privacy unit is the owner's record by default (``dp-unit``; :func:`privtune.client.data.privacy_unit`):
one training example per record on both tracks. Every sample rate below is the public
``dp-sample-rate`` and every step count comes from the run config, never from the number of the
owner's records, which is private (``privtune.common.dpsgd``). The noise multiplier is solved once
for the whole run over everything an example takes part in (:func:`dp_schedule`): every federated
round (``local-steps`` at rate q) and then the member track (``member-steps`` on each shard at rate
q). The ledger composes all of it in one
history, so ``dp-epsilon`` is reached exactly when the last member is trained. Composing the shards
sequentially over-counts (a document sits in one shard only, so parallel composition would allow
less noise); it keeps one history and one figure per owner. The owner's ledger budget (``dp-budget``
in node config) is checked before training: a round that would exceed it is declined, not run.

Nothing from this training but the noised adapter leaves the site: the mean loss, the epsilon and
the noise multiplier (all functions of the private examples or of their number) stay in the ledger
and the owner's log.
"""

from __future__ import annotations

import math
import time

import torch

from privtune.client.data import OwnerData, privacy_unit
from privtune.client.site import SiteConfig
from privtune.common.dpsgd import PAD, DpSgdConfig, Release, train_round
from privtune.common.errors import PrivtuneError
from privtune.common.federation.config import FederationConfig
from privtune.common.ledger import Ledger
from privtune.common.offsite.train import TrainConfig, TrainResult, check_converging, trainable_parameters
from privtune.common.tokens import TokenRows


def dp_schedule(cfg: FederationConfig, data: OwnerData) -> tuple[tuple[float, int], ...]:
    """(sample rate, steps) of all the private training planned for this owner's examples: public settings only.

    ``data`` gives only the number of member shards, which is ``member-shards``.
    """
    federated = (cfg.dp_sample_rate, cfg.num_server_rounds * cfg.local_steps)
    members = tuple((cfg.dp_sample_rate, cfg.member_track_steps) for _ in data.shards)
    return (federated, *members)


def train_with_dpsgd(
    model: torch.nn.Module,
    examples: torch.Tensor | TokenRows,
    train_cfg: TrainConfig,
    site: SiteConfig,
    cfg: FederationConfig,
    schedule: tuple[tuple[float, int], ...],
    proximal_mu: float = 0.0,
    release: Release | None = None,
) -> TrainResult:
    if train_cfg.gradient_checkpointing:
        raise PrivtuneError(
            "gradient checkpointing does not combine with DP-SGD: Opacus' per-example gradient hooks must see "
            "each layer run once per step; turn off gradient-checkpointing or dp-epsilon"
        )
    rows = TokenRows.of(examples)
    ledger = Ledger(site.ledger_path, site.owner)
    if ledger.budget("dpsgd") is None:
        ledger.set_budget("dpsgd", site.dp_budget, delta=cfg.dp_delta)
    dp_cfg = DpSgdConfig(
        max_grad_norm=cfg.dp_max_grad_norm, delta=cfg.dp_delta, target_epsilon=cfg.dp_epsilon, schedule=schedule
    )
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=train_cfg.lr)
    start = time.perf_counter()
    result = train_round(
        model,
        optimizer,
        rows.ids,
        labels=rows.labels,
        sample_rate=cfg.dp_sample_rate,
        batch_size=train_cfg.batch_size,
        steps=train_cfg.steps,
        config=dp_cfg,
        ledger=ledger,
        # DP-SGD's batch sampling and noise come from secret randomness: the run config's seed is the
        # model owner's, and noise it can regenerate is noise it can subtract.
        seed=None,
        proximal_mu=proximal_mu,
        release=release,
        unit=privacy_unit(cfg, site),
        max_physical_batch=cfg.dp_physical_batch,
    )
    check_converging(site.owner, result.losses)
    # Poisson batches at a public rate can all be empty on a small shard: the round then adds noise
    # only and has no loss to report (nan), which is not divergence.
    losses = result.losses or [math.nan]
    return TrainResult(
        mean_loss=sum(losses) / len(losses),
        last_loss=losses[-1],
        steps=train_cfg.steps,
        tokens=round(train_cfg.steps * train_cfg.batch_size * float((rows.ids != PAD).sum(dim=1).float().mean())),
        seconds=time.perf_counter() - start,
    )
