"""Where privtune computes: one device policy for the model owner, the data owners and the replicas.

``--device auto`` (the default everywhere) takes the first CUDA device when torch sees one and the
CPU otherwise, so the same command runs on a laptop and on a GPU site. On CUDA devices with bf16
support, forward passes run under bf16 autocast: matrix products in bf16, reductions, losses and
the optimiser's state in float32, and the trainable weights stay float32, so DP-SGD's per-sample
gradients are computed and clipped in float32. The CPU path computes in float32 throughout.
"""

from __future__ import annotations

import argparse
import contextlib
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from privtune.common.errors import PrivtuneError

DEVICE_CHOICES = "auto | cpu | cuda | cuda:N"
_SPEC = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def resolve_device(spec: str = "auto") -> torch.device:
    """The torch device a ``--device`` value names; refuses CUDA where torch sees none."""
    spec = spec.strip().lower()
    if not _SPEC.match(spec):
        raise PrivtuneError(f"--device {spec!r} is not one of {DEVICE_CHOICES}")
    if spec == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise PrivtuneError(
            f"--device {spec}: torch {torch.__version__} sees no CUDA device (built with CUDA: "
            f"{torch.version.cuda or 'no'}); use --device cpu, or install a CUDA build of torch on a GPU machine"
        )
    device = torch.device(spec if ":" in spec else "cuda:0")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise PrivtuneError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return device


@dataclass(frozen=True)
class DevicePolicy:
    """A device and how to compute on it."""

    device: torch.device
    mixed_precision: bool

    @classmethod
    def resolve(cls, spec: str = "auto", mixed_precision: bool = True) -> DevicePolicy:
        device = resolve_device(spec)
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return cls(device, mixed_precision and bf16)

    @property
    def weights_dtype(self) -> torch.dtype:
        """dtype for frozen weights loaded onto this device (bf16 halves a GPU's memory for them)."""
        return torch.bfloat16 if self.mixed_precision else torch.float32

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        if self.mixed_precision:
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                yield
        else:
            yield

    def place(self, module: nn.Module, what: str, dtype: torch.dtype = torch.float32) -> nn.Module:
        """``module`` on this device in ``dtype``, refused with a clear error when it cannot fit on a GPU.

        Models load on the host first; the check runs before the copy to CUDA, where running out of
        memory would otherwise end in an allocator traceback halfway through the copy.
        """
        if self.device.type == "cuda":
            check_fits(parameter_count(module), dtype, self.device, what)
        return module.to(self.device, dtype=dtype)

    @contextlib.contextmanager
    def hosting(self, modules: Mapping[str, nn.Module | None]) -> Iterator[None]:
        """The named modules on this device under its autocast for the block, back on the host after.

        For the model owner's steps that compute on the device but hash, plug in or save on the host
        (weight digests and packages read host memory). All of them are checked to fit together.
        """
        present = [m for m in modules.values() if m is not None]
        if self.device.type == "cuda":
            what = " + ".join(name for name, m in modules.items() if m is not None)
            check_fits(sum(parameter_count(m) for m in present), torch.float32, self.device, what)
        try:
            for module in present:
                module.to(self.device)
            with self.autocast():
                yield
        finally:
            for module in present:
                module.cpu()

    def describe(self) -> str:
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "CPU"
        return f"{self.device} ({name}{', bf16 autocast' if self.mixed_precision else ', float32'})"


def available_bytes(device: torch.device) -> int:
    """Free memory on the device: CUDA's free memory, or the host's MemAvailable."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise PrivtuneError("cannot read the host's available memory from /proc/meminfo")


def check_fits(n_parameters: int, dtype: torch.dtype, device: torch.device, what: str, overhead: float = 1.2) -> None:
    """Refuse to load ``what`` when its weights alone (times ``overhead``) exceed the device's free memory."""
    bytes_needed = int(n_parameters * torch.finfo(dtype).bits / 8 * overhead)
    free = available_bytes(device)
    if bytes_needed > free:
        raise PrivtuneError(
            f"{what} needs about {bytes_needed / 2**30:.1f} GiB on {device} ({n_parameters / 1e9:.2f} B parameters in "
            f"{str(dtype).removeprefix('torch.')}) but only {free / 2**30:.1f} GiB is free: use a GPU with more "
            "memory, bf16 weights (--device cuda), or a smaller model"
        )


def parameter_count(module: nn.Module) -> int:
    """Parameters counted once each (``parameters()`` skips tied duplicates)."""
    return sum(p.numel() for p in module.parameters())


def to_host(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict on the CPU: what is sent, hashed or saved (Flower arrays and digests read host memory)."""
    return {name: tensor.detach().cpu() for name, tensor in state.items()}


def add_device_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument(
        "--device",
        default="auto",
        help=f"where to compute: {DEVICE_CHOICES} (default auto: the first CUDA device when torch sees one, else CPU)",
    )
