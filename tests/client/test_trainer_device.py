"""A data owner trains where the run config's ``device`` says; CUDA where torch sees none is refused."""

from __future__ import annotations

import pytest
import torch

from privtune.client.site import SiteConfig
from privtune.client.trainer import OwnerTrainer
from privtune.common.errors import PrivtuneError
from privtune.common.federation.config import FederationConfig
from privtune.common.federation.records import SERVER_ROUND
from privtune.common.models import load_model
from privtune.common.offsite import OffsiteConfig, adapter_state
from privtune.common.offsite.package import EmulatorPackage

RUN = {"local-steps": 3, "batch-size": 4, "block-size": 32, "max-train-blocks": 16, "lora-r": 4, "member-shards": 0}


def trainer(tmp_path, **run) -> OwnerTrainer:
    cfg = FederationConfig.from_run_config({**RUN, "run-dir": str(tmp_path / "server"), **run})
    site = SiteConfig.from_node_config({"partition-id": 0, "num-partitions": 2, "workspace": str(tmp_path)}, cfg)
    return OwnerTrainer(site, cfg)


@pytest.mark.parametrize("mode", [{}, {"dp-epsilon": 8.0}])
def test_a_tiny_model_trains_on_the_cpu_through_the_trainer(tmp_path, mode):
    owner = trainer(tmp_path, device="cpu", **mode)
    assert owner.policy.device == torch.device("cpu") and not owner.policy.mixed_precision
    offsite = OffsiteConfig(k_bottom=1, k_top=1, n_emulator=2, adapter="lora", lora_r=4, lora_alpha=8)
    owner.package = EmulatorPackage.build(load_model("tiny-llama").model, offsite)
    start = adapter_state(owner.package.instantiate(seed=0))
    state, _metrics = owner.train_round(start, {SERVER_ROUND: 1})
    assert set(state) == set(start)
    assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in state.values())
    assert any(not torch.equal(state[name], start[name]) for name in start), "training changed nothing"


def test_cuda_without_cuda_is_refused_when_the_owner_starts(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(PrivtuneError, match="sees no CUDA device"):
        trainer(tmp_path, device="cuda")
    with pytest.raises(PrivtuneError, match="is not one of"):
        trainer(tmp_path, device="gpu")
