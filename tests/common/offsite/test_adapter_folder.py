"""Adapter folders are peft folders: the real ``PeftModel.from_pretrained`` loads them onto the full model."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from privtune.common.errors import PrivtuneError
from privtune.common.families import family_by_name
from privtune.common.offsite import (
    EmulatorPackage,
    OffsiteConfig,
    adapter_manifest,
    adapter_state,
    load_adapter,
    plug_in,
    save_adapter,
)
from privtune.common.offsite.adapter import MANIFEST_FILE, PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE
from tests.common.offsite.conftest import tiny, token_blocks

CONFIGS = [
    OffsiteConfig(k_bottom=1, k_top=2, n_emulator=2, adapter="lora", lora_r=4),
    OffsiteConfig(k_bottom=1, k_top=2, n_emulator=2, adapter="full"),
    OffsiteConfig(k_bottom=1, k_top=1, n_emulator=2, adapter="lora", carry_embeddings=True),
    OffsiteConfig(k_bottom=0, k_top=2, n_emulator=2, adapter="full", carry_embeddings=True),
]


def trained_like(family: str, cfg: OffsiteConfig, seed: int = 1):
    """A package's adapter moved away from its start, as training would (LoRA B nonzero, blocks changed)."""
    model = EmulatorPackage.build(tiny(family), cfg).instantiate(seed=0)
    generator = torch.Generator().manual_seed(seed)
    state = {k: v + 0.05 * torch.randn(v.shape, generator=generator) for k, v in adapter_state(model).items()}
    return state, adapter_manifest(model)


def peft_model(family: str, folder):
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's notes on LayerNorm targets and tied embeddings
        return PeftModel.from_pretrained(tiny(family), str(folder)).eval()


@pytest.mark.parametrize("cfg", CONFIGS, ids=["lora", "full", "lora+embeddings", "full+embeddings"])
def test_peft_loads_the_adapter_onto_the_full_model_as_privtune_plugs_it_in(tmp_path, family, cfg):
    state, manifest = trained_like(family, cfg)
    folder = save_adapter(tmp_path / "adapter", state, manifest)
    assert sorted(p.name for p in folder.iterdir()) == [PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE, MANIFEST_FILE]
    x = token_blocks(2, 12)
    with torch.no_grad():
        expected = plug_in(tiny(family), state, manifest)(x).logits
        got = peft_model(family, folder)(x).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(expected, tiny(family)(x).logits, atol=1e-3)  # the adapter changes the model
    loaded, loaded_manifest = load_adapter(folder)
    assert loaded_manifest == manifest and loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_top_blocks_sit_at_the_full_models_last_indices(tmp_path):
    cfg = OffsiteConfig(k_bottom=1, k_top=2, n_emulator=1, adapter="lora", lora_r=4)
    state, manifest = trained_like("llama", cfg)
    config = json.loads((save_adapter(tmp_path / "a", state, manifest) / PEFT_CONFIG_FILE).read_text())
    blocks = family_by_name("llama").blocks
    assert {int(t.removeprefix(f"{blocks}.").split(".")[0]) for t in config["target_modules"]} == {0, 4, 5}
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["task_type"] == "CAUSAL_LM"
    gpt2_state, gpt2_manifest = trained_like("gpt2", cfg)
    gpt2 = json.loads((save_adapter(tmp_path / "g", gpt2_state, gpt2_manifest) / PEFT_CONFIG_FILE).read_text())
    assert gpt2["fan_in_fan_out"] is True  # GPT-2's Conv1D


def test_folders_that_disagree_or_are_in_the_earlier_layout_are_refused(tmp_path):
    state, manifest = trained_like("opt", CONFIGS[2])
    folder = save_adapter(tmp_path / "a", state, manifest)

    config = json.loads((folder / PEFT_CONFIG_FILE).read_text())
    (folder / PEFT_CONFIG_FILE).write_text(json.dumps(dict(config, r=16)))
    with pytest.raises(PrivtuneError, match="r is 16.*manifest gives 8"):
        load_adapter(folder)
    (folder / PEFT_CONFIG_FILE).write_text(json.dumps(config))

    tensors = load_file(str(folder / PEFT_WEIGHTS_FILE))
    head = "base_model.model.lm_head.weight"  # tiny OPT ties its head to the carried embeddings
    save_file(dict(tensors, **{head: tensors[head] + 1}), str(folder / PEFT_WEIGHTS_FILE))
    with pytest.raises(PrivtuneError, match="tied head"):
        load_adapter(folder)
    save_file({k: v for k, v in tensors.items() if k != head}, str(folder / PEFT_WEIGHTS_FILE))
    with pytest.raises(PrivtuneError, match="missing.*lm_head"):
        load_adapter(folder)

    legacy = tmp_path / "legacy"
    legacy.mkdir()
    save_file(state, str(legacy / "adapter.safetensors"))
    (legacy / "manifest.json").write_text(json.dumps(manifest.to_dict()))
    with pytest.raises(PrivtuneError, match="earlier layout.*save_adapter"):
        load_adapter(legacy)
    with pytest.raises(PrivtuneError, match="not a saved adapter.*missing"):
        load_adapter(tmp_path / "nowhere")
