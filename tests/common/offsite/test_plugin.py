import dataclasses

import pytest
import torch

from privtune.common.errors import PrivtuneError
from privtune.common.families import get_blocks
from privtune.common.offsite import (
    EmulatorPackage,
    OffsiteConfig,
    TrainConfig,
    adapter_manifest,
    adapter_state,
    plug_in,
    train_adapter,
)
from tests.common.offsite.conftest import snapshot, tiny, token_blocks

UNDROPPED = OffsiteConfig(k_bottom=1, k_top=2, n_emulator=3)
DROPPED = OffsiteConfig(k_bottom=2, k_top=1, n_emulator=1)


def trained(package: EmulatorPackage, steps: int = 3) -> torch.nn.Module:
    model = package.instantiate(seed=0)
    train_adapter(model, token_blocks(), TrainConfig(steps=steps, batch_size=4, lr=2e-2, seed=0), progress=False)
    return model.eval()


@pytest.mark.parametrize("adapter", ["full", "lora"])
def test_untouched_adapter_restores_the_full_model_exactly(family, adapter):
    full = tiny(family)
    model = EmulatorPackage.build(full, dataclasses.replace(DROPPED, adapter=adapter)).instantiate(seed=0)
    plugged = plug_in(full, adapter_state(model), adapter_manifest(model))
    assert plugged is not full
    reference, result = full.state_dict(), plugged.state_dict()
    assert reference.keys() == result.keys()
    assert all(torch.equal(reference[k], result[k]) for k in reference)


@pytest.mark.parametrize("adapter", ["full", "lora"])
def test_plugged_full_model_equals_emulator_with_adapter_on_an_undropped_split(family, adapter):
    full = tiny(family)
    before = snapshot(full)
    model = trained(EmulatorPackage.build(full, dataclasses.replace(UNDROPPED, adapter=adapter)))
    plugged = plug_in(full, adapter_state(model), adapter_manifest(model))
    x = token_blocks(3, 20, seed=7)
    with torch.no_grad():
        expected, got, untouched = model(x).logits, plugged(x).logits, full(x).logits
    assert not torch.allclose(expected, untouched, atol=1e-3)  # the adapter did something
    if adapter == "full":
        assert torch.equal(got, expected)
    else:  # merged B@A*scale vs. the separate LoRA path: equal up to float rounding
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert all(torch.equal(before[k], v) for k, v in full.state_dict().items())


def test_lora_plugin_equals_the_lora_blocks_of_a_dropped_emulator(family):
    full = tiny(family)
    model = trained(EmulatorPackage.build(full, DROPPED))
    plugged = plug_in(full, adapter_state(model), adapter_manifest(model))
    split = model.offsite_split
    hidden = torch.randn(2, 10, 256, generator=torch.Generator().manual_seed(0))
    for pos, orig in enumerate(split.kept):
        if orig not in split.adapter:
            continue
        lora_layers = {n: m for n, m in get_blocks(model)[pos].named_modules() if hasattr(m, "lora_A")}
        assert lora_layers
        for name, layer in lora_layers.items():
            merged = get_blocks(plugged)[orig].get_submodule(name)
            x = hidden[..., : layer.lora_A["default"].in_features]
            with torch.no_grad():
                torch.testing.assert_close(merged(x), layer(x), rtol=1e-5, atol=1e-5)
            assert not torch.equal(merged.weight, get_blocks(full)[orig].get_submodule(name).weight)


def test_carried_embeddings_are_plugged_in():
    full = tiny("gpt2")
    model = trained(EmulatorPackage.build(full, dataclasses.replace(DROPPED, carry_embeddings=True)))
    state = adapter_state(model)
    plugged = plug_in(full, state, adapter_manifest(model))
    assert torch.equal(plugged.get_input_embeddings().weight, state["input_embeddings.weight"])
    assert plugged.get_output_embeddings().weight is plugged.get_input_embeddings().weight


def test_mismatched_adapters_are_refused():
    model = trained(EmulatorPackage.build(tiny("llama"), DROPPED), steps=1)
    state, manifest = adapter_state(model), adapter_manifest(model)
    with pytest.raises(PrivtuneError, match="llama model, this is a opt"):
        plug_in(tiny("opt"), state, manifest)
    with pytest.raises(PrivtuneError, match="6-block model, this one has 8"):
        plug_in(tiny("llama", n_layers=8), state, manifest)
    with pytest.raises(PrivtuneError, match="not the ones the adapter was made from"):
        plug_in(tiny("llama", seed=1), state, manifest)  # same shapes, other weights
    moved = {k.replace("block.5.", "block.4."): v for k, v in state.items()}
    with pytest.raises(PrivtuneError, match="missing"):
        plug_in(tiny("llama"), moved, manifest)
    forged = dataclasses.replace(
        manifest, indices=[0, 1, 4], shapes={k.replace("block.5.", "block.4."): v for k, v in manifest.shapes.items()}
    )
    with pytest.raises(PrivtuneError, match="not the ones"):
        plug_in(tiny("llama"), moved, forged)
    name = "block.5.mlp.up_proj.lora_B"
    with pytest.raises(PrivtuneError, match="shape"):
        plug_in(tiny("llama"), dict(state, **{name: torch.zeros(65, 8)}), manifest)
