import dataclasses
import json

import pytest
import torch

from privtune.common.errors import PrivtuneError
from privtune.common.offsite import (
    EmulatorPackage,
    OffsiteConfig,
    TrainConfig,
    adapter_state,
    build_emulator_model,
    cache_package,
    load_cached,
    train_adapter,
)
from privtune.common.offsite.package import MANIFEST_FILE, TENSORS_FILE
from tests.common.offsite.conftest import tiny, token_blocks

DROPPED = OffsiteConfig(k_bottom=1, k_top=1, n_emulator=2, adapter="full")


def assert_same_package(a: EmulatorPackage, b: EmulatorPackage) -> None:
    ta, ma = a.to_parts()
    tb, mb = b.to_parts()
    assert ma == mb and a.content_hash == b.content_hash
    assert ta.keys() == tb.keys()
    for name in ta:
        assert ta[name].dtype == tb[name].dtype and torch.equal(ta[name], tb[name]), name


@pytest.mark.parametrize("adapter", ["full", "lora"])
def test_undropped_emulator_with_adapter_equals_the_full_model_exactly(family, adapter):
    full = tiny(family)
    package = EmulatorPackage.build(full, OffsiteConfig(k_bottom=1, k_top=2, n_emulator=3, adapter=adapter))
    model = package.instantiate(seed=0)
    x = token_blocks(3, 20)
    with torch.no_grad():
        assert torch.equal(model(x).logits, full(x).logits)


def test_instantiated_dropped_emulator_equals_the_built_emulator(family):
    full = tiny(family)
    emulator = build_emulator_model(full, DROPPED)
    model = EmulatorPackage.build(full, DROPPED).instantiate()
    x = token_blocks(2, 16)
    with torch.no_grad():
        assert torch.equal(model(x).logits, emulator(x).logits)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tie restored


def test_manifest_describes_the_split():
    package = EmulatorPackage.build(tiny("llama"), DROPPED)
    manifest = package.manifest
    json.dumps(manifest)
    assert manifest["family"] == "llama" and manifest["n_blocks"] == 6
    assert manifest["split"] == {"n_blocks": 6, "bottom": [0], "middle_kept": [1, 4], "top": [5]}
    assert manifest["config"]["num_hidden_layers"] == 6 and manifest["emulator_config"]["num_hidden_layers"] == 4
    assert manifest["dtype"] == "float32" and manifest["offsite"] == DROPPED.to_dict()
    names = set(manifest["tensors"])
    assert "adapter/block.5.mlp.down_proj.weight" in names and "adapter/block.0.self_attn.q_proj.weight" in names
    assert "emulator/model.layers.2.mlp.down_proj.weight" in names  # original block 4 sits at position 2
    assert not any(n.startswith("emulator/model.layers.0.") or n.startswith("emulator/model.layers.3.") for n in names)
    assert manifest["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}


def test_save_load_and_parts_round_trip_bit_exactly(tmp_path, family):
    package = EmulatorPackage.build(tiny(family), DROPPED)
    loaded = EmulatorPackage.load(package.save(tmp_path / "pkg"))
    assert_same_package(package, loaded)
    tensors, manifest = loaded.to_parts()
    assert_same_package(package, EmulatorPackage.from_parts({k: v.numpy() for k, v in tensors.items()}, manifest))
    x = token_blocks(2, 12)
    with torch.no_grad():
        assert torch.equal(package.instantiate()(x).logits, loaded.instantiate()(x).logits)


def test_bf16_package_round_trips(tmp_path):
    package = EmulatorPackage.build(tiny("llama").to(torch.bfloat16), DROPPED)
    assert package.manifest["dtype"] == "bfloat16"
    loaded = EmulatorPackage.load(package.save(tmp_path / "pkg"))
    assert_same_package(package, loaded)
    assert next(loaded.instantiate().parameters()).dtype == torch.bfloat16


def test_corrupt_or_tampered_packages_are_refused(tmp_path):
    package = EmulatorPackage.build(tiny("gpt2"), DROPPED)
    folder = package.save(tmp_path / "pkg")
    raw = bytearray((folder / TENSORS_FILE).read_bytes())
    raw[-5] ^= 0x01  # flip one bit of the last tensor's data
    (folder / TENSORS_FILE).write_bytes(bytes(raw))
    with pytest.raises(PrivtuneError, match="content hash mismatch") as err:
        EmulatorPackage.load(folder)
    assert str(folder) in str(err.value)

    folder = package.save(tmp_path / "pkg2")
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    manifest["split"]["middle_kept"] = [2, 4]
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(PrivtuneError, match="pkg2"):
        EmulatorPackage.load(folder)

    (folder / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(PrivtuneError, match="corrupt"):
        EmulatorPackage.load(folder)
    with pytest.raises(PrivtuneError, match="missing"):
        EmulatorPackage.load(tmp_path / "nowhere")


def test_tampered_parts_are_refused():
    tensors, manifest = EmulatorPackage.build(tiny("opt"), DROPPED).to_parts()
    name = "adapter/block.0.fc1.weight"
    forged = dict(tensors, **{name: tensors[name] + 1e-3})
    with pytest.raises(PrivtuneError, match="hash mismatch"):
        EmulatorPackage.from_parts(forged, manifest)
    with pytest.raises(PrivtuneError, match="hash mismatch"):
        EmulatorPackage.from_parts(tensors, dict(manifest, content_hash="0" * 64))
    with pytest.raises(PrivtuneError, match="do not match"):
        EmulatorPackage.from_parts({k: v for k, v in tensors.items() if k != name}, manifest)


@pytest.mark.parametrize("adapter", ["full", "lora"])
def test_training_the_instantiated_model_leaves_the_package_untouched(adapter):
    package = EmulatorPackage.build(tiny("llama"), dataclasses.replace(DROPPED, adapter=adapter))
    before, _ = package.to_parts()
    before = {k: v.clone() for k, v in before.items()}
    model = package.instantiate()
    start = adapter_state(model)
    train_adapter(model, token_blocks(), TrainConfig(steps=3, batch_size=4, lr=1e-2, seed=0), progress=False)
    after, _ = package.to_parts()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(not torch.equal(start[k], v) for k, v in adapter_state(model).items())


@pytest.mark.parametrize("adapter", ["full", "lora"])
def test_only_trained_tensors_are_copied_out_of_the_package(adapter):
    """A LoRA owner's model shares the adapter blocks' frozen weights with the package (memory);
    a full adapter trains them, so it gets copies."""
    package = EmulatorPackage.build(tiny("llama"), dataclasses.replace(DROPPED, adapter=adapter))
    tensors, _ = package.to_parts()
    stored = {t.data_ptr() for t in tensors.values()}
    model = package.instantiate()
    frozen = [p for p in model.parameters() if not p.requires_grad]
    trained = [p for p in model.parameters() if p.requires_grad]
    assert frozen and trained
    assert all(p.data_ptr() in stored for p in frozen)
    assert not any(p.data_ptr() in stored for p in trained)
    assert len(frozen) > len(list(build_emulator_model(tiny("llama"), DROPPED).parameters())) // 2


def test_cache_by_hash(tmp_path):
    package = EmulatorPackage.build(tiny("gpt2"), DROPPED)
    assert load_cached(package.content_hash, tmp_path) is None
    folder = cache_package(package, tmp_path)
    assert folder.name == package.content_hash
    assert_same_package(package, load_cached(package.content_hash, tmp_path))
    (folder / TENSORS_FILE).write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="broken cached"):
        assert load_cached(package.content_hash, tmp_path) is None
    cache_package(package, tmp_path)  # the broken copy was removed, so this caches afresh
    assert_same_package(package, load_cached(package.content_hash, tmp_path))
