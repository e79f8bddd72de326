"""One data owner's part in a federated run: emulator cache, local data, adapter training.

The emulator package arrives once per run (the server attaches it the first time it addresses this
node) and is cached by content hash in the owner's workspace; every round after that carries the
adapter only. Data is loaded, perturbed and encoded once per run.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from privtune.client.data import OwnerData, load_owner_data, owner_tokenizer
from privtune.client.site import SiteConfig
from privtune.common.errors import PrivtuneError
from privtune.common.federation.config import FederationConfig
from privtune.common.federation.records import (
    EMULATOR,
    EMULATOR_MANIFEST,
    NUM_EXAMPLES,
    from_arrays,
    manifest_from_record,
)
from privtune.common.offsite.adapter import adapter_state, load_adapter_state
from privtune.common.offsite.evaluate import perplexity
from privtune.common.offsite.package import EmulatorPackage, cache_package, load_cached
from privtune.common.offsite.train import TrainConfig, train_adapter

EMULATOR_HASH = "emulator-hash"
EMBEDDINGS_KEYED = "embeddings-keyed"


class OwnerTrainer:
    def __init__(self, site: SiteConfig, cfg: FederationConfig) -> None:
        self.site, self.cfg = site, cfg
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
        wanted = str(content.config_records["config"].get(EMULATOR_HASH, ""))
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
        return model

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
        data = self.data()
        model = self._model(global_state, config)
        train_cfg = TrainConfig(
            steps=self.cfg.local_steps,
            batch_size=self.cfg.batch_size,
            lr=self.cfg.learning_rate,
            seed=self.cfg.seed + int(config.get("server-round", 0)),
        )
        mu = float(config.get("proximal-mu", 0.0))
        hooks = _proximal_hooks(model, mu) if mu > 0 else []
        privacy: dict[str, float] = dict(data.ldp)
        try:
            if self.cfg.dp_epsilon > 0:
                from privtune.client.private_training import train_with_dpsgd

                result, dp = train_with_dpsgd(model, data.train, train_cfg, self.site, self.cfg)
                privacy.update(dp)
            else:
                result = train_adapter(model, data.train, train_cfg, progress=False)
        finally:
            for hook in hooks:
                hook.remove()
        if not math.isfinite(result.mean_loss):
            raise PrivtuneError(f"{self.site.owner}: training diverged (loss {result.mean_loss}); lower learning-rate")
        metrics = {
            NUM_EXAMPLES: float(len(data.train)),
            "train-loss": result.mean_loss,
            "train-seconds": result.seconds,
            "train-tokens": float(result.tokens),
            **privacy,
        }
        return adapter_state(model), metrics

    def evaluate(self, global_state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, float]:
        data = self.data()
        model = self._model(global_state, config)
        ppl = perplexity(model, data.heldout)
        return {NUM_EXAMPLES: float(len(data.heldout)), "eval-loss": math.log(ppl)}


def _proximal_hooks(model: torch.nn.Module, mu: float) -> list:
    """FedProx: add mu * (w - w_global) to each trainable parameter's gradient, which is the
    gradient of the proximal term mu/2 * ||w - w_global||^2 (w_global = the weights at round start)."""
    hooks = []
    for param in model.parameters():
        if param.requires_grad:
            anchor = param.detach().clone()
            hooks.append(param.register_hook(lambda grad, p=param, a=anchor: grad + mu * (p.detach() - a)))
    return hooks
