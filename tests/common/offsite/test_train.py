import math

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from privtune.common.errors import PrivtuneError
from privtune.common.families import get_blocks
from privtune.common.offsite import EmulatorPackage, OffsiteConfig, TrainConfig, adapter_state, train_adapter
from privtune.common.offsite.lm import final_hidden, lean_lm_loss, lm_loss, recompute_frozen_blocks, supports_lean
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


def _loss_and_grads(model, blocks, loss_fn):
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model, blocks)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_lean_loss_gives_the_plain_loss_and_gradients(family):
    """Chunked head (chunks that do not divide the tokens) and recomputed frozen blocks change no number."""
    model = EmulatorPackage.build(tiny(family), CFG).instantiate(seed=0)
    model.eval()  # dropout off (tiny GPT-2/OPT have it): both passes see the same function
    with torch.no_grad():  # a non-zero B, so the LoRA A factors get gradients too
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    blocks = token_blocks(3, 24)
    plain, plain_grads = _loss_and_grads(model, blocks, lm_loss)
    lean, lean_grads = _loss_and_grads(model, blocks, lambda m, b: lean_lm_loss(m, b, chunk=10))
    assert lean == pytest.approx(plain, rel=1e-6)
    assert set(lean_grads) == set(plain_grads) and len(plain_grads) > 0
    for name, grad in plain_grads.items():
        assert torch.allclose(lean_grads[name], grad, atol=1e-6), name


def test_only_frozen_blocks_are_recomputed_and_their_forward_is_restored():
    model = EmulatorPackage.build(tiny("llama"), CFG).instantiate(seed=0)
    blocks = get_blocks(model)
    with recompute_frozen_blocks(model) as count:
        assert count == 2  # the emulator's two middle blocks; the adapter blocks hold LoRA factors
        assert [("forward" in vars(b)) for b in blocks] == [False, True, True, False]
    assert not any("forward" in vars(b) for b in blocks)


def _saved_for_backward(model, fn) -> tuple[int, list[tuple[int, ...]]]:
    """Bytes (one count per storage) and shapes of what autograd keeps for the backward, weights aside."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}
    shapes: list[tuple[int, ...]] = []

    def keep(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
            shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        fn()
    return sum(storages.values()), shapes


def test_the_configured_head_chunk_sets_how_many_tokens_each_head_checkpoint_keeps():
    model = EmulatorPackage.build(tiny("llama"), CFG).instantiate(seed=0)
    hidden = model.config.hidden_size
    cfg = TrainConfig(steps=1, batch_size=2, seed=0, head_chunk=7)
    _, shapes = _saved_for_backward(model, lambda: train_adapter(model, token_blocks(2, 24), cfg, progress=False))
    tokens = {s[0] for s in shapes if len(s) == 2 and s[1] == hidden} - {2 * 24}  # [48, hidden]: inside blocks
    assert tokens == {7, 4}  # 2 x 23 targets in six chunks of 7 and one of 4
    with pytest.raises(PrivtuneError, match="head_chunk"):
        TrainConfig(head_chunk=0)


def test_lean_training_keeps_no_logits_and_only_block_inputs_of_the_frozen_middle():
    model = EmulatorPackage.build(tiny("llama"), CFG).instantiate(seed=0)
    vocab = model.config.vocab_size
    blocks = token_blocks(4, 48)
    _, plain_shapes = _saved_for_backward(model, lambda: lm_loss(model, blocks))
    _, lean_shapes = _saved_for_backward(model, lambda: lean_lm_loss(model, blocks, chunk=16))
    assert any(shape[-1] == vocab for shape in plain_shapes)
    assert not any(shape[-1] == vocab for shape in lean_shapes)

    kept, _ = _saved_for_backward(model, lambda: final_hidden(model, blocks))
    with recompute_frozen_blocks(model):
        recomputed, _ = _saved_for_backward(model, lambda: final_hidden(model, blocks))
    assert recomputed < 0.75 * kept  # 2 of 4 blocks keep only their input


def test_lean_is_skipped_for_a_wrapper():
    model = EmulatorPackage.build(tiny("llama"), CFG).instantiate(seed=0)
    assert supports_lean(model)
    assert not supports_lean(torch.nn.Sequential(model))
