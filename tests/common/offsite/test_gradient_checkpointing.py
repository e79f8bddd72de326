"""Gradient checkpointing of the adapter blocks: the same gradients and updates, less kept for the backward,
and refused where Opacus' per-example hooks would see a layer run twice."""

from __future__ import annotations

import contextlib

import pytest
import torch

from privtune.common.errors import PrivtuneError
from privtune.common.families import get_blocks
from privtune.common.offsite import EmulatorPackage, OffsiteConfig, TrainConfig, adapter_state, train_adapter
from privtune.common.offsite.lm import final_hidden, lean_lm_loss, lm_loss, recompute_blocks
from privtune.common.offsite.train import checkpointed_adapter_blocks
from tests.common.offsite.conftest import tiny, token_blocks
from tests.common.offsite.test_train import _saved_for_backward

CFG = OffsiteConfig(k_bottom=1, k_top=1, n_emulator=2, adapter="lora")


def emulator(family: str) -> torch.nn.Module:
    model = EmulatorPackage.build(tiny(family), CFG).instantiate(seed=0)
    with torch.no_grad():  # a non-zero B, so the LoRA A factors get gradients too
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    return model


def block_runs(model: torch.nn.Module) -> tuple[list[int], list]:
    """Per block, how often its first child runs (a recomputed block runs it again in the backward)."""
    counts = [0] * len(get_blocks(model))
    hooks = []
    for i, block in enumerate(get_blocks(model)):
        first = next(iter(block.children()))

        def count(*_args, i=i):
            counts[i] += 1

        hooks.append(first.register_forward_hook(count))
    return counts, hooks


@pytest.mark.parametrize("loss_fn", [lm_loss, lean_lm_loss], ids=["plain", "lean"])
def test_the_same_gradients_with_the_adapter_blocks_recomputed(family, loss_fn):
    model = emulator(family)
    model.train()  # dropout on (tiny GPT-2/OPT): the recomputation must replay the same masks
    blocks = token_blocks(3, 24)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(1)
        model.zero_grad(set_to_none=True)
        counts, hooks = block_runs(model)
        with recompute_blocks(model, frozen=False) if checkpointing else contextlib.nullcontext():
            loss = loss_fn(model, blocks)
        loss.backward()
        for hook in hooks:
            hook.remove()
        adapter_runs = [counts[0], counts[-1]]
        assert adapter_runs == ([2, 2] if checkpointing else [1, 1])
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert set(grads[0]) == set(grads[1]) and len(grads[0]) > 0
    for name, grad in grads[0].items():
        assert torch.allclose(grads[1][name], grad, atol=1e-6), name


def test_recomputed_adapter_blocks_keep_less_for_the_backward():
    model = emulator("llama")
    blocks = token_blocks(4, 48)
    kept, _ = _saved_for_backward(model, lambda: final_hidden(model, blocks))
    with recompute_blocks(model, frozen=False) as count:
        assert count == 2  # the bottom and the top adapter block
        recomputed, _ = _saved_for_backward(model, lambda: final_hidden(model, blocks))
    assert recomputed < 0.75 * kept
    assert not any("forward" in vars(b) for b in get_blocks(model))


def test_training_with_checkpointing_makes_the_same_updates():
    blocks = token_blocks()
    states = []
    for checkpointing in (False, True):
        model = emulator("gpt2")
        cfg = TrainConfig(steps=3, batch_size=4, lr=1e-2, seed=3, gradient_checkpointing=checkpointing)
        counts, hooks = block_runs(model)
        torch.manual_seed(1)  # the same dropout masks in both runs
        train_adapter(model, blocks, cfg, progress=False)
        for hook in hooks:
            hook.remove()
        assert counts[0] == (6 if checkpointing else 3)
        assert not any("forward" in vars(b) for b in get_blocks(model)), "the blocks' forward was not restored"
        states.append(adapter_state(model))
    for name, value in states[0].items():
        assert torch.allclose(states[1][name], value, atol=1e-6), name


def test_a_wrapped_model_is_refused():
    """Opacus' GradSampleModule is such a wrapper: its hooks must see each layer run once per step."""
    from opacus import GradSampleModule

    wrapped = GradSampleModule(emulator("llama"))
    with pytest.raises(PrivtuneError, match="once per step"):
        checkpointed_adapter_blocks(wrapped)
    cfg = TrainConfig(steps=1, batch_size=2, gradient_checkpointing=True)
    with pytest.raises(PrivtuneError, match="turn off gradient-checkpointing or DP-SGD"):
        train_adapter(wrapped, token_blocks(4, 16), cfg, progress=False)
