"""4-bit frozen emulator blocks: which layers would be quantised, their size, and the refusals where it cannot run.

The quantisation itself needs CUDA and bitsandbytes (``bench.offsite_cuda --quantize 4bit`` runs it).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from privtune.common.device import parameter_count
from privtune.common.errors import PrivtuneError
from privtune.common.families import get_blocks
from privtune.common.offsite import EmulatorPackage, OffsiteConfig
from privtune.common.offsite.quantize import (
    INSTALL,
    NF4_BITS_PER_WEIGHT,
    check_quantize,
    quantization_targets,
    quantize_blockers,
    quantized_bytes,
)
from tests.common.offsite.conftest import tiny

HIDDEN = 32  # the conftest's tiny models


def emulator(family: str, adapter: str = "lora") -> torch.nn.Module:
    cfg = OffsiteConfig(k_bottom=1, k_top=1, n_emulator=2, adapter=adapter)
    return EmulatorPackage.build(tiny(family), cfg).instantiate(seed=0)


def block_of(model: torch.nn.Module, name: str) -> int:
    """Position in the block stack of the block holding module ``name``."""
    modules = dict(model.named_modules())
    target = modules[name]
    return next(i for i, block in enumerate(get_blocks(model)) if any(m is target for m in block.modules()))


@pytest.mark.parametrize("adapter", ["lora", "full"])
def test_only_the_linear_layers_of_the_frozen_middle_are_targets(adapter):
    model = emulator("llama", adapter)
    targets = quantization_targets(model)
    per_block = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert {block_of(model, t.name) for t in targets} == {1, 2}  # the middle; 0 and 3 are adapter blocks
    for position in (1, 2):
        assert {t.name.rsplit(".", 1)[1] for t in targets if block_of(model, t.name) == position} == per_block
    assert not any("embed" in t.name or "lm_head" in t.name or "lora" in t.name for t in targets)
    modules = dict(model.named_modules())
    for t in targets:
        layer = modules[t.name]
        assert not layer.weight.requires_grad and not t.transposed
        assert tuple(layer.weight.shape) == (t.out_features, t.in_features)
    shapes = {t.name.rsplit(".", 1)[1]: (t.in_features, t.out_features) for t in targets}
    assert shapes["k_proj"] == (HIDDEN, HIDDEN // 2) and shapes["down_proj"] == (2 * HIDDEN, HIDDEN)


def test_gpt2_conv1d_layers_are_targets_with_their_weight_transposed():
    model = emulator("gpt2")
    targets = quantization_targets(model)
    assert len(targets) == 2 * 4  # c_attn, attn.c_proj, c_fc, mlp.c_proj in each middle block
    assert all(t.transposed for t in targets)
    modules = dict(model.named_modules())
    for t in targets:
        assert tuple(modules[t.name].weight.shape) == (t.in_features, t.out_features)
    assert {(t.in_features, t.out_features) for t in targets} == {
        (HIDDEN, 3 * HIDDEN),
        (HIDDEN, HIDDEN),
        (HIDDEN, 4 * HIDDEN),
        (4 * HIDDEN, HIDDEN),
    }


def test_a_model_that_trains_everywhere_has_no_target():
    model = tiny("opt")
    model.requires_grad_(True)
    assert quantization_targets(model) == []
    model.requires_grad_(False)
    assert {block_of(model, t.name) for t in quantization_targets(model)} == set(range(len(get_blocks(model))))


def test_the_quantised_size_counts_nf4_for_the_targets_and_float32_for_the_rest():
    model = emulator("llama")
    targets = quantization_targets(model)
    quantised = sum(t.n_weights for t in targets)
    modules = dict(model.named_modules())
    assert quantised == sum(modules[t.name].weight.numel() for t in targets)
    full = parameter_count(model) * 4
    expected = full - quantised * 4 + quantised * NF4_BITS_PER_WEIGHT / 8
    assert quantized_bytes(model, targets) == int(expected) < full
    assert quantized_bytes(model, []) == full


def test_none_is_accepted_anywhere_and_an_unknown_mode_is_refused():
    check_quantize("none", torch.device("cpu"))
    with pytest.raises(PrivtuneError, match="must be one of none, 4bit"):
        check_quantize("8bit", torch.device("cpu"))


def test_4bit_on_the_cpu_is_refused_saying_what_is_missing():
    blockers = quantize_blockers(torch.device("cpu"))
    assert any("CUDA only" in b and "--device cuda" in b for b in blockers)
    bnb_missing = importlib.util.find_spec("bitsandbytes") is None
    assert any(INSTALL in b for b in blockers) == bnb_missing
    with pytest.raises(PrivtuneError, match="emulator-quantize=4bit cannot run here") as refused:
        check_quantize("4bit", torch.device("cpu"))
    assert all(b in str(refused.value) for b in blockers)
    assert INSTALL == "pip install 'privtune[gpu4bit]'"


def test_the_extra_the_refusal_names_pins_bitsandbytes():
    import tomllib
    from pathlib import Path

    from privtune.common.offsite.quantize import EXTRA

    pyproject = tomllib.loads((Path(__file__).resolve().parents[3] / "pyproject.toml").read_text())
    assert pyproject["project"]["optional-dependencies"][EXTRA] == ["bitsandbytes==0.50.2"]
    assert "bitsandbytes" not in " ".join(pyproject["project"]["dependencies"])
