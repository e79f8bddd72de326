"""The owners' emulator-quantize and gradient-checkpointing options, from the run config to the training loop."""

from __future__ import annotations

import pytest
import torch

from privtune.client.private_training import train_with_dpsgd
from privtune.client.site import SiteConfig
from privtune.common.errors import PrivtuneError
from privtune.common.federation.config import FederationConfig
from privtune.common.federation.records import SERVER_ROUND
from privtune.common.models import load_model
from privtune.common.offsite import OffsiteConfig, adapter_state, prepare_adapter
from privtune.common.offsite.package import EmulatorPackage
from privtune.common.offsite.train import TrainConfig
from privtune.common.tokens import TokenRows
from tests.client.test_trainer_device import trainer


def test_the_options_are_run_config_keys_off_by_default():
    cfg = FederationConfig()
    assert cfg.emulator_quantize == "none" and cfg.gradient_checkpointing is False
    cfg = FederationConfig.from_run_config({"emulator-quantize": "4bit", "gradient-checkpointing": "true"})
    assert cfg.emulator_quantize == "4bit" and cfg.gradient_checkpointing is True
    with pytest.raises(PrivtuneError, match="emulator-quantize must be one of"):
        FederationConfig.from_run_config({"emulator-quantize": "8bit"})


def test_4bit_without_cuda_is_refused_when_the_owner_starts(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(PrivtuneError, match="emulator-quantize=4bit cannot run here.*CUDA only"):
        trainer(tmp_path, device="cpu", **{"emulator-quantize": "4bit"})


def test_gradient_checkpointing_reaches_the_loop_and_changes_no_update(tmp_path):
    offsite = OffsiteConfig(k_bottom=1, k_top=1, n_emulator=2, adapter="lora", lora_r=4, lora_alpha=8)
    package = EmulatorPackage.build(load_model("tiny-llama").model, offsite)
    start = adapter_state(package.instantiate(seed=0))
    states = []
    for checkpointing in (False, True):
        owner = trainer(tmp_path / str(checkpointing), device="cpu", **{"gradient-checkpointing": checkpointing})
        assert owner._train_config(3, 1).gradient_checkpointing is checkpointing
        owner.package = package
        state, _metrics = owner.train_round(start, {SERVER_ROUND: 1})
        states.append(state)
    assert any(not torch.equal(states[0][k], start[k]) for k in start), "training changed nothing"
    for name, value in states[0].items():
        assert torch.allclose(states[1][name], value, atol=1e-6), name


def test_dpsgd_refuses_gradient_checkpointing_before_charging_anything(tmp_path):
    with pytest.raises(PrivtuneError, match="gradient-checkpointing does not combine with DP-SGD"):
        FederationConfig.from_run_config({"dp-epsilon": 8.0, "gradient-checkpointing": True})
    model = prepare_adapter(
        load_model("tiny-llama").model, OffsiteConfig(k_bottom=1, k_top=1, n_emulator=1, adapter="lora"), seed=0
    )
    cfg = FederationConfig.from_run_config({"dp-epsilon": 8.0, "dp-unit": "block", "run-dir": str(tmp_path / "s")})
    site = SiteConfig("a", tmp_path / "a", None, None, None, None, None, float("inf"), 100.0)
    examples = TokenRows.of(torch.randint(3, 200, (64, 16), generator=torch.Generator().manual_seed(0)))
    train_cfg = TrainConfig(steps=2, batch_size=8, lr=1e-2, gradient_checkpointing=True)
    before = adapter_state(model)
    with pytest.raises(PrivtuneError, match="Opacus' per-example gradient hooks"):
        train_with_dpsgd(model, examples, train_cfg, site, cfg, ((8 / 64, 2),))
    assert not site.ledger_path.exists()
    assert all(torch.equal(before[k], v) for k, v in adapter_state(model).items())
