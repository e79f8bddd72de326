import math

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from privtune.common.errors import PrivtuneError
from privtune.common.offsite import EmulatorPackage, OffsiteConfig, TrainConfig, adapter_state, train_adapter
from privtune.common.offsite.train import shuffled_batches
from tests.common.offsite.conftest import tiny, token_blocks

CFG = OffsiteConfig(k_bottom=1, k_top=1, n_emulator=2, adapter="lora")


def test_bf16_training_runs_and_learns():
    model = EmulatorPackage.build(tiny("llama"), CFG).instantiate(seed=0)
    data = token_blocks(4, 24).repeat(4, 1)  # few distinct blocks: the loss must fall quickly
    result = train_adapter(
        model, data, TrainConfig(steps=30, batch_size=4, lr=3e-2, dtype="bf16", seed=0), progress=False
    )
    assert result.steps == 30 and math.isfinite(result.last_loss)
    assert result.last_loss < result.mean_loss
    assert all(t.dtype == torch.float32 for t in adapter_state(model).values())  # autocast keeps fp32 weights


def test_same_seed_same_result_and_an_injected_optimizer_and_loader():
    blocks = token_blocks()
    runs = []
    for _ in range(2):
        model = EmulatorPackage.build(tiny("gpt2"), CFG).instantiate(seed=0)
        train_adapter(model, blocks, TrainConfig(steps=4, batch_size=4, lr=1e-2, seed=3), progress=False)
        runs.append(adapter_state(model))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])

    model = EmulatorPackage.build(tiny("gpt2"), CFG).instantiate(seed=0)
    params = [p for p in model.parameters() if p.requires_grad]
    sgd = torch.optim.SGD(params, lr=0.0)  # a zero step must leave the adapter untouched
    before = adapter_state(model)
    loader = DataLoader(TensorDataset(blocks), batch_size=5, shuffle=False)
    result = train_adapter(model, blocks, TrainConfig(steps=3), optimizer=sgd, batches=loader, progress=False)
    assert result.tokens == 3 * 5 * 24
    assert all(torch.equal(before[k], v) for k, v in adapter_state(model).items())
    result = train_adapter(
        model,
        blocks,
        TrainConfig(steps=2, lr=0.5),
        progress=False,
        optimizer_factory=lambda ps: torch.optim.SGD(ps, lr=0.5),
    )
    assert any(not torch.equal(before[k], v) for k, v in adapter_state(model).items())


def test_shuffled_batches_cover_each_epoch_and_resume_identically():
    blocks = torch.arange(10).unsqueeze(1)
    stream = shuffled_batches(blocks, 4, seed=1)
    first = [next(stream) for _ in range(5)]  # 20 items = two epochs
    flat = torch.cat(first).flatten().tolist()
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    resumed = shuffled_batches(blocks, 4, seed=1, start_step=3)
    assert all(torch.equal(next(resumed), first[i]) for i in (3, 4))


def test_bad_settings_are_refused():
    with pytest.raises(PrivtuneError, match="dtype"):
        TrainConfig(dtype="fp16")
    from privtune.common.offsite.distill import DistillConfig
    from privtune.common.ult.pretrain import PretrainConfig

    for config, what in ((TrainConfig, "training"), (DistillConfig, "distillation"), (PretrainConfig, "pretraining")):
        for bad in ({"steps": -1}, {"batch_size": 0}, {"lr": 0.0}):
            with pytest.raises(PrivtuneError, match=f"{what} needs steps >= 0"):
                config(**bad)
    with pytest.raises(PrivtuneError, match="checkpoint_every=0"):
        PretrainConfig(checkpoint_every=0)
    model = tiny("llama")
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(PrivtuneError, match="no trainable"):
        train_adapter(model, token_blocks(), TrainConfig(steps=1), progress=False)
    with pytest.raises(PrivtuneError, match="non-empty"):
        train_adapter(model, torch.zeros(0, 8, dtype=torch.long), TrainConfig(steps=1), progress=False)
