import pytest
import torch

from privtune.common.device import DevicePolicy, available_bytes, check_fits, resolve_device
from privtune.common.errors import PrivtuneError


def test_auto_takes_cpu_without_cuda_and_cpu_computes_in_float32():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert resolve_device("auto") == torch.device("cpu")
    policy = DevicePolicy.resolve("auto")
    assert not policy.mixed_precision and policy.weights_dtype == torch.float32
    with policy.autocast():
        assert torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype == torch.float32


@pytest.mark.parametrize("spec", ["gpu", "cuda:x", "cuda:-1", "tpu", ""])
def test_malformed_device_names_are_refused(spec):
    with pytest.raises(PrivtuneError, match="is not one of"):
        resolve_device(spec)


def test_cuda_without_cuda_says_what_to_do():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(PrivtuneError, match="sees no CUDA device.*--device cpu"):
        resolve_device("cuda:0")


def test_a_model_that_cannot_fit_is_refused_before_loading():
    free = available_bytes(torch.device("cpu"))
    assert free > 0
    check_fits(1000, torch.float32, torch.device("cpu"), "a tiny model")
    with pytest.raises(PrivtuneError, match="GiB is free"):
        check_fits(free, torch.float32, torch.device("cpu"), "a huge model")


def test_the_device_option_parses_and_resolves():
    import argparse

    from privtune.common.device import add_device_argument

    parser = argparse.ArgumentParser()
    add_device_argument(parser)
    assert parser.parse_args([]).device == "auto"
    assert resolve_device(parser.parse_args(["--device", "cpu"]).device) == torch.device("cpu")
    assert resolve_device(parser.parse_args(["--device", " CPU "]).device) == torch.device("cpu")


def test_tied_weights_are_counted_once():
    from privtune.common.device import parameter_count
    from privtune.common.models import load_model

    model = load_model("tiny-llama").model  # ties its head to the input embedding
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    every = sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))
    assert parameter_count(model) == every - model.get_input_embeddings().weight.numel()


def test_hosting_computes_under_the_policys_autocast_and_leaves_it_after_a_failure():
    policy = DevicePolicy(torch.device("cpu"), mixed_precision=True)  # bf16 autocast exists on the CPU too
    layer = torch.nn.Linear(3, 3)
    with pytest.raises(RuntimeError, match="inside"):
        with policy.hosting({"layer": layer, "absent": None}):
            assert layer(torch.ones(1, 3)).dtype == torch.bfloat16
            raise RuntimeError("inside")
    assert layer(torch.ones(1, 3)).dtype == torch.float32 and layer.weight.dtype == torch.float32


def test_place_moves_and_casts():
    policy = DevicePolicy.resolve("cpu")
    layer = policy.place(torch.nn.Linear(2, 2), "a layer", torch.bfloat16)
    assert layer.weight.dtype == torch.bfloat16 and layer.weight.device.type == "cpu"
