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
