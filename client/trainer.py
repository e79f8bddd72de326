"""One data owner's part in a federated run: emulator cache, local data, adapter training.

The emulator package arrives once per run (the server attaches it the first time it addresses this
node) and is cached by content hash in the owner's workspace; every round after that carries the
adapter only. Data is loaded, perturbed and encoded once per run.

Two tracks train on the owner's data. The federated track starts each round from the global
aggregate, so after round 1 it depends on every owner's data. The member track trains the owner's
PMixED members: from the public starting adapter the server sends (never an aggregate), member i on
shard i of this owner's documents alone, so each member depends on one shard of one owner. Under
DP-SGD both tracks are private training charged to the owner's ledger.

Training runs where the run config's ``device`` says (:mod:`privtune.common.device`). Plain training
runs its forward passes under the device's bf16 autocast; DP-SGD computes in float32 throughout,
because Opacus builds the per-example gradients from the activations it captured, and bf16 ones
would give per-example norms a few tenths of a percent off: clipping would no longer bound each
example's influence by exactly max-grad-norm. Adapters leave the trainer on the host.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from privtune.client.data import OwnerData, load_owner_data, owner_tokenizer
from privtune.client.releases import EVALUATION_WITHHELD, may_evaluate, train_metrics
from privtune.client.site import SiteConfig
from privtune.common.device import DevicePolicy, to_host
from privtune.common.dpsgd import Release
from privtune.common.errors import PrivtuneError
from privtune.common.federation.config import FederationConfig
from privtune.common.federation.records import (
    EMBEDDINGS_KEYED,
    EMULATOR,
    EMULATOR_HASH,
    EMULATOR_MANIFEST,
    NUM_EXAMPLES,
    PROXIMAL_MU,
    SERVER_ROUND,
    from_arrays,
    manifest_from_record,
    round_config,
)
from privtune.common.offsite.adapter import adapter_state, load_adapter_state
from privtune.common.offsite.evaluate import perplexity
from privtune.common.offsite.package import EmulatorPackage, cache_package, load_cached
from privtune.common.offsite.quantize import check_quantize, place_quantized
from privtune.common.offsite.train import TrainConfig, TrainResult, check_converging, train_adapter
from privtune.common.tokens import TokenRows


class OwnerTrainer:
    def __init__(self, site: SiteConfig, cfg: FederationConfig) -> None:
        self.site, self.cfg = site, cfg
        self.policy = DevicePolicy.resolve(cfg.device)
        check_quantize(cfg.emulator_quantize, self.policy.device)
        self.package: EmulatorPackage | None = None
        self._data: OwnerData | None = None

    @property
    def emulator_cache(self):
        return self.site.workspace / "emulators"

    def receive_emulator(self, content) -> None:
        """Take the emulator from the message if it is attached, else from the cache by hash."""
        if EMULATOR in content.array_records:
            package = EmulatorPackage.from_parts(
                from_arrays(content.array_records[EMULATOR]),
                manifest_from_record(content.config_records[EMULATOR_MANIFEST]),
            )
            cache_package(package, self.emulator_cache)
            self.package = package
            return
        wanted = str(round_config(content).get(EMULATOR_HASH, ""))
        if self.package is not None and self.package.content_hash == wanted:
            return
        self.package = load_cached(wanted, self.emulator_cache) if wanted else None
        if self.package is None:
            raise PrivtuneError(
                f"{self.site.owner}: emulator {wanted[:16] or '?'} is not in the cache at "
                f"{self.emulator_cache}; the server will resend it next round"
            )

    def data(self) -> OwnerData:
        if self._data is None:
            self._data = load_owner_data(self.site, self.cfg, owner_tokenizer(self.site, self.cfg))
        return self._data

    def _model(self, global_state: dict[str, torch.Tensor], config: dict[str, Any]):
        if self.package is None:
            raise PrivtuneError(f"{self.site.owner}: no emulator package yet; a round's message carries or names one")
        model = self.package.instantiate(seed=self.cfg.seed)
        if self.cfg.encoding == "ult" and not config.get(EMBEDDINGS_KEYED, False):
            global_state = self._warm_start_keyed(global_state)
        load_adapter_state(model, global_state)
        what = f"{self.site.owner}'s emulator"
        if self.cfg.emulator_quantize == "4bit":
            # Under DP-SGD the owner computes in float32 throughout (module docstring), the 4-bit layers too.
            compute_dtype = torch.float32 if self.cfg.dp_epsilon > 0 else self.policy.weights_dtype
            return place_quantized(self.policy, model, what, compute_dtype)
        return self.policy.place(model, what)

    def _warm_start_keyed(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Reorder the public embedding/head rows into the federation key's id order.

        The model owner pretrained with the public ranking; under the key, rank r has a different id.
        Moving row ``base + r`` to the keyed id gives every owner the same warm start without the
        model owner being sent the key.
        """
        from privtune.common.ult.relabel import key_rows, relabel_state

        table, key = self.site.ult_table, self.site.ult_key
        if table is None or key is None:
            raise PrivtuneError(f"{self.site.owner}: ULT encoding needs the site's ULT table and key files")
        return relabel_state(state, key_rows(table, key))

    def train_round(
        self, global_state: dict[str, torch.Tensor], config: dict[str, Any]
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """The federated track: one round from the global adapter; the metrics this mode may release."""
        data = self.data()
        model = self._model(global_state, config)
        server_round = int(config.get(SERVER_ROUND, 0))
        result = self._train(
            model,
            data.train,
            self._train_config(self.cfg.local_steps, server_round),
            float(config.get(PROXIMAL_MU, 0.0)),
            Release("federated adapter", f"round {server_round}"),
        )
        return to_host(adapter_state(model)), train_metrics(self.cfg, data, result)

    def train_members(self, public_state: dict[str, torch.Tensor], config: dict[str, Any]) -> list[dict]:
        """The member track: one adapter per shard, each from the public start on that shard alone."""
        data = self.data()
        if not data.shards:
            raise PrivtuneError(f"{self.site.owner}: member-shards is 0, this run trains no PMixED members")
        seed = int(config.get(SERVER_ROUND, 0))
        members = []
        for shard, blocks in enumerate(data.shards):
            model = self._model(public_state, {EMBEDDINGS_KEYED: False})
            release = Release("PMixED member", f"shard {shard + 1} of {len(data.shards)}, from the public start")
            self._train(model, blocks, self._train_config(self.cfg.member_track_steps, seed + shard), 0.0, release)
            members.append(to_host(adapter_state(model)))
        return members

    def _train_config(self, steps: int, seed_offset: int) -> TrainConfig:
        return TrainConfig(
            steps=steps,
            batch_size=self.cfg.batch_size,
            lr=self.cfg.learning_rate,
            seed=self.cfg.seed + seed_offset,
            gradient_checkpointing=self.cfg.gradient_checkpointing,
        )

    def _train(
        self, model: torch.nn.Module, blocks: TokenRows, train_cfg: TrainConfig, mu: float, release: Release
    ) -> TrainResult:
        """Train ``model`` in place: DP-SGD when configured (charged to the ledger as ``release``), else plain."""
        blocks = blocks.to(self.policy.device)
        if self.cfg.dp_epsilon > 0:
            from privtune.client.private_training import dp_schedule, train_with_dpsgd

            schedule = dp_schedule(self.cfg, self.data())
            result = train_with_dpsgd(model, blocks, train_cfg, self.site, self.cfg, schedule, mu, release)
        else:
            hooks = _proximal_hooks(model, mu) if mu > 0 else []
            try:
                with self.policy.autocast():
                    result = train_adapter(model, blocks, train_cfg, progress=False)
            finally:
                for hook in hooks:
                    hook.remove()
            check_converging(self.site.owner, [result.mean_loss])
        return result

    def evaluate(self, global_state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, float]:
        if not may_evaluate(self.cfg):
            raise PrivtuneError(f"{self.site.owner}: {EVALUATION_WITHHELD}")
        data = self.data()
        model = self._model(global_state, config)
        with self.policy.autocast():
            ppl = perplexity(model, data.heldout.to(self.policy.device))
        return {NUM_EXAMPLES: float(len(data.heldout)), "eval-loss": math.log(ppl)}


def _proximal_hooks(model: torch.nn.Module, mu: float) -> list:
    """FedProx without DP: add mu * (w - w_global) to each trainable parameter's gradient, which is the
    gradient of the proximal term mu/2 * ||w - w_global||^2 (w_global = the weights at round start).
    Under DP-SGD Opacus overwrites these gradients; :func:`privtune.common.dpsgd.train_round` adds
    the term after privatisation instead."""
    hooks = []
    for param in model.parameters():
        if param.requires_grad:
            anchor = param.detach().clone()
            hooks.append(param.register_hook(lambda grad, p=param, a=anchor: grad + mu * (p.detach() - a)))
    return hooks
