"""The GPU benchmark's host-side pieces; the measurement itself needs a GPU and is not run here."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import offsite_cuda
from privtune.common.device import DevicePolicy, parameter_count

ROOT = Path(__file__).resolve().parents[1]


def test_the_1b_config_builds_a_llama_of_about_a_billion_parameters():
    from transformers import AutoModelForCausalLM

    config = offsite_cuda.model_config(offsite_cuda.CONFIGS_DIR / "llama-1b.json")
    with torch.device("meta"):  # shapes only: no 4 GB of random weights
        model = AutoModelForCausalLM.from_config(config)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert 0.9e9 < parameter_count(model) < 1.3e9
    assert offsite_cuda.emulator_split(config.num_hidden_layers, None) == {"k_bottom": 2, "k_top": 2, "n_emulator": 9}


@pytest.mark.slow
def test_the_smollm2_config_has_the_packaged_models_architecture(smollm2):
    """Timings of the random-init config stand for the packaged model only if every weight has the same shape."""
    from transformers import AutoModelForCausalLM

    config = offsite_cuda.model_config(offsite_cuda.CONFIGS_DIR / "smollm2-135m.json")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert shapes == {k: v.shape for k, v in smollm2.model.state_dict().items()}
    assert parameter_count(model) == parameter_count(smollm2.model)
    packaged = smollm2.model.config
    for key in ("rms_norm_eps", "tie_word_embeddings", "hidden_act", "head_dim", "num_key_value_heads"):
        assert getattr(config, key) == pytest.approx(getattr(packaged, key)), key
    assert config.rope_parameters["rope_theta"] == packaged.rope_parameters["rope_theta"]


def test_without_cuda_it_exits_with_a_message_not_a_traceback():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    for device in ("cuda", "auto"):
        done = subprocess.run(
            [sys.executable, "-m", "bench.offsite_cuda", "--device", device], capture_output=True, text=True, cwd=ROOT
        )
        assert done.returncode == 1 and "Traceback" not in done.stderr
        assert "bench.offsite_cuda" in done.stderr and "GPU" in done.stderr


def test_every_configuration_trains_and_is_compared_on_the_host():
    """The same code path as on the GPU, with the CPU standing in (no peak memory there)."""
    args = argparse.Namespace(
        batch_size=2, block_size=16, timed_steps=1, n_emulator=None, lora_r=4, seed=0, quantize="none", head_chunk=7
    )
    full = offsite_cuda.build_model("tiny-llama", seed=0)
    blocks = offsite_cuda.random_blocks(full.config.vocab_size, 4, args.block_size, seed=0)
    before = {k: v.clone() for k, v in full.state_dict().items()}
    results = offsite_cuda.run_settings(full, blocks, args, offsite_cuda.Device(DevicePolicy.resolve("cpu")))
    assert set(results) == {"full", "full_lean", "lora"}
    assert all(not r["out_of_memory"] and r["tokens_per_s"] > 0 for r in results.values())
    assert results["lora"]["split"] == {"k_bottom": 2, "k_top": 2, "n_emulator": 1}
    assert all(torch.equal(before[k], v) for k, v in full.state_dict().items()), "fine-tuning changed the source model"
    assert set(offsite_cuda.ratios(results).values()) == {None}  # no CUDA peak to compare


def test_ratios_compare_lora_with_each_full_fine_tuning_that_fit():
    results = {
        "full": {"out_of_memory": False, "tokens_per_s": 100.0, "peak_mb": 800.0},
        "full_lean": {"out_of_memory": True, "peak_mb": 900.0},
        "lora": {"out_of_memory": False, "tokens_per_s": 650.0, "peak_mb": 100.0},
    }
    assert offsite_cuda.ratios(results) == {
        "throughput_ratio_lora_over_full": 6.5,
        "memory_ratio_full_over_lora": 8.0,
        "throughput_ratio_lora_over_full_lean": None,
        "memory_ratio_full_lean_over_lora": None,
    }


def test_the_4bit_row_is_added_on_request_and_compared_with_lora_and_full():
    assert [s.kind for s in offsite_cuda.settings("none")] == ["full", "full_lean", "lora"]
    assert [s.kind for s in offsite_cuda.settings("4bit")] == ["full", "full_lean", "lora", "lora_4bit"]
    results = {
        "full": {"out_of_memory": False, "tokens_per_s": 100.0, "peak_mb": 800.0},
        "full_lean": {"out_of_memory": False, "tokens_per_s": 100.0, "peak_mb": 400.0},
        "lora": {"out_of_memory": False, "tokens_per_s": 650.0, "peak_mb": 100.0},
        "lora_4bit": {"out_of_memory": False, "tokens_per_s": 325.0, "peak_mb": 40.0},
    }
    figures = offsite_cuda.ratios(results)
    assert figures["memory_ratio_lora_over_lora_4bit"] == 2.5
    assert figures["throughput_ratio_lora_4bit_over_lora"] == 0.5
    assert figures["memory_ratio_full_over_lora_4bit"] == 20.0


def test_4bit_without_cuda_exits_saying_what_is_missing():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    offsite_cuda.check_quantize_here("none", DevicePolicy.resolve("cpu"))
    with pytest.raises(SystemExit, match="--quantize 4bit: emulator-quantize=4bit cannot run here.*CUDA only"):
        offsite_cuda.check_quantize_here("4bit", DevicePolicy.resolve("cpu"))
