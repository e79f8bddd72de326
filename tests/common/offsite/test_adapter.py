import dataclasses

import pytest
import torch

from privtune.common.errors import PrivtuneError
from privtune.common.offsite import (
    EmulatorPackage,
    OffsiteConfig,
    TrainConfig,
    adapter_manifest,
    adapter_state,
    build_emulator_model,
    load_adapter,
    load_adapter_state,
    prepare_adapter,
    save_adapter,
    train_adapter,
)
from tests.common.offsite.conftest import snapshot, tiny, token_blocks


def test_names_are_canonical_and_keyed_by_original_block_index():
    package = EmulatorPackage.build(
        tiny("llama"), OffsiteConfig(k_bottom=1, k_top=1, n_emulator=2, adapter="lora", lora_r=4)
    )
    state = adapter_state(package.instantiate())
    blocks = {name.split(".")[1] for name in state}
    assert blocks == {"0", "5"}  # block 5 sits at position 3 of the emulator
    assert state["block.5.self_attn.q_proj.lora_A"].shape == (4, 32)
    assert state["block.5.self_attn.q_proj.lora_B"].shape == (32, 4)
    assert state["block.0.mlp.down_proj.lora_A"].shape == (4, 64)
    assert all(torch.count_nonzero(t) == 0 for n, t in state.items() if n.endswith("lora_B"))
    assert len(state) == 2 * 7 * 2  # 7 linear layers per LLaMA block, A and B, two blocks


def test_gpt2_conv1d_lora_shapes_follow_in_out_features():
    state = adapter_state(
        EmulatorPackage.build(tiny("gpt2"), OffsiteConfig(k_bottom=1, k_top=1, n_emulator=1)).instantiate()
    )
    assert state["block.0.attn.c_attn.lora_A"].shape == (8, 32)  # c_attn maps 32 -> 96
    assert state["block.0.attn.c_attn.lora_B"].shape == (96, 8)


@pytest.mark.parametrize(
    "cfg",
    [
        OffsiteConfig(k_bottom=1, k_top=1, n_emulator=2, adapter="full"),
        OffsiteConfig(k_bottom=1, k_top=1, n_emulator=2, adapter="lora"),
        OffsiteConfig(k_bottom=1, k_top=1, n_emulator=2, adapter="lora", carry_embeddings=True),
        OffsiteConfig(k_bottom=0, k_top=2, n_emulator=3, adapter="full", carry_embeddings=True),
    ],
)
def test_training_changes_only_adapter_parameters(family, cfg):
    model = EmulatorPackage.build(tiny(family), cfg).instantiate(seed=1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    before = snapshot(model)
    adapter_before = adapter_state(model)
    result = train_adapter(model, token_blocks(), TrainConfig(steps=3, batch_size=4, lr=1e-2, seed=0), progress=False)
    assert result.steps == 3 and result.tokens == 3 * 4 * 24 and result.mean_loss > 0
    after = model.state_dict()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and changed <= trainable | {"lm_head.weight"}  # a tied head changes with the embedding
    adapter_after = adapter_state(model)
    assert all(not torch.equal(adapter_before[n], adapter_after[n]) for n in adapter_after if "lora_A" not in n)
    expected = {"input_embeddings.weight"} if cfg.carry_embeddings else set()
    assert expected <= set(adapter_after)
    assert ("output_embeddings.weight" in adapter_after) is False  # tiny models tie the head


def test_prepare_on_a_plain_emulator_and_on_the_full_model():
    cfg = OffsiteConfig(k_bottom=1, k_top=1, n_emulator=2, adapter="full")
    emulator = prepare_adapter(build_emulator_model(tiny("opt"), cfg), cfg)
    full = prepare_adapter(tiny("opt"), cfg)
    assert adapter_state(emulator).keys() == adapter_state(full).keys()
    assert all(torch.equal(adapter_state(emulator)[k], v) for k, v in adapter_state(full).items())
    with pytest.raises(PrivtuneError, match="already"):
        prepare_adapter(full, cfg)
    with pytest.raises(PrivtuneError, match="does not give"):
        prepare_adapter(build_emulator_model(tiny("opt"), cfg), dataclasses.replace(cfg, n_emulator=3))


def test_load_adapter_state_and_files_round_trip(tmp_path):
    package = EmulatorPackage.build(tiny("gpt2"), OffsiteConfig(k_bottom=1, k_top=1, n_emulator=2, adapter="lora"))
    trained = package.instantiate(seed=0)
    train_adapter(trained, token_blocks(), TrainConfig(steps=2, batch_size=4, lr=1e-2, seed=0), progress=False)
    state, manifest = adapter_state(trained), adapter_manifest(trained)
    loaded_state, loaded_manifest = load_adapter(save_adapter(tmp_path / "a", state, manifest))
    assert loaded_manifest == manifest
    fresh = package.instantiate(seed=5)
    load_adapter_state(fresh, loaded_state)
    x = token_blocks(2, 12)
    with torch.no_grad():
        assert torch.equal(fresh(x).logits, trained.eval()(x).logits)


def test_updates_that_do_not_belong_to_the_package_are_refused():
    cfg = OffsiteConfig(k_bottom=1, k_top=1, n_emulator=2, adapter="lora")
    package = EmulatorPackage.build(tiny("llama"), cfg)
    model = package.instantiate()
    state, manifest = adapter_state(model), adapter_manifest(model)
    manifest.validate_against(package.manifest, state)
    manifest.validate_against(package.adapter_manifest, state)

    other_family = EmulatorPackage.build(tiny("opt"), cfg).instantiate()
    with pytest.raises(PrivtuneError, match="model family"):
        adapter_manifest(other_family).validate_against(package.manifest, adapter_state(other_family))
    other_split = EmulatorPackage.build(tiny("llama"), dataclasses.replace(cfg, k_top=2, n_emulator=1)).instantiate()
    with pytest.raises(PrivtuneError, match="block indices"):
        adapter_manifest(other_split).validate_against(package.manifest, adapter_state(other_split))
    other_weights = EmulatorPackage.build(tiny("llama", seed=1), cfg).instantiate()
    with pytest.raises(PrivtuneError, match="emulator hash"):
        adapter_manifest(other_weights).validate_against(package.manifest, adapter_state(other_weights))

    name = "block.5.mlp.up_proj.lora_A"
    with pytest.raises(PrivtuneError, match="shape"):
        manifest.validate_against(package.manifest, dict(state, **{name: torch.zeros(8, 33)}))
    with pytest.raises(PrivtuneError, match="dtype"):
        manifest.validate_against(package.manifest, dict(state, **{name: state[name].double()}))
    with pytest.raises(PrivtuneError, match="NaN"):
        manifest.validate_against(package.manifest, dict(state, **{name: torch.full_like(state[name], float("nan"))}))
    with pytest.raises(PrivtuneError, match="missing"):
        manifest.validate_against(package.manifest, {k: v for k, v in state.items() if k != name})
    with pytest.raises(PrivtuneError, match="unexpected"):
        manifest.validate_against(package.manifest, dict(state, **{"block.3.mlp.up_proj.lora_A": state[name]}))
    forged = dataclasses.replace(manifest, indices=[0, 4])
    with pytest.raises(PrivtuneError, match="block indices"):
        forged.validate_against(package.manifest, state)
    with pytest.raises(PrivtuneError, match="shape"):
        load_adapter_state(model, dict(state, **{name: torch.zeros(8, 33)}))
