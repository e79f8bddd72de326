"""Optional 4-bit (NF4) base weights for the emulator's frozen blocks, with bitsandbytes on CUDA.

Most of what a data owner holds in memory is the emulator's frozen middle; NF4 stores its weight
matrices in 4 bits plus a scale per 64 weights, at most 1/7 of float32. Only the linear layers
(GPT-2's ``Conv1D`` included) of blocks without a trainable parameter are quantised: adapter blocks,
the LoRA factors and the base weights they adapt, stay in float32 and train as before, and so do
norms and biases. The embedding is left alone: in most families it is tied to the LM head every loss
chunk reads, and in ULT runs it is trained.

bitsandbytes is an optional extra (``pip install 'privtune[gpu4bit]'``) and quantises on CUDA only.
Where either is missing the option is refused, never dropped: a silent fall-back to full precision
would run a different model in more memory than the user planned for.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
from torch import nn

from privtune.common.device import DevicePolicy, available_bytes, parameter_count
from privtune.common.errors import PrivtuneError
from privtune.common.families import get_blocks
from privtune.common.federation.config import QUANTIZE_CHOICES
from privtune.common.offsite.lm import is_frozen

EXTRA = "gpu4bit"
INSTALL = f"pip install 'privtune[{EXTRA}]'"
NF4_BLOCK = 64
"""Weights per NF4 scale (bitsandbytes' default block size on CUDA)."""
NF4_BITS_PER_WEIGHT = 4 + 32 / NF4_BLOCK
"""Stored bits per quantised weight, at most: the 4-bit code and its share of the block's float32 scale
(bitsandbytes' default double quantisation stores the scales in 8 bits, about 4.13 bits in all)."""


@dataclass(frozen=True)
class QuantTarget:
    """A linear layer to be stored in NF4: its module path and shape (``transposed``: a GPT-2 ``Conv1D``,
    whose weight is stored ``[in, out]`` rather than ``nn.Linear``'s ``[out, in]``)."""

    name: str
    in_features: int
    out_features: int
    transposed: bool

    @property
    def n_weights(self) -> int:
        return self.in_features * self.out_features


def quantization_targets(model: nn.Module) -> list[QuantTarget]:
    """The linear layers of the blocks with no trainable parameter, in module order.

    Decided by what trains, not by the split's indices, so it is right for LoRA and full adapters and
    for any model whose blocks the families module finds. Call it after the adapter is prepared.
    """
    from transformers.pytorch_utils import Conv1D

    names = {id(module): name for name, module in model.named_modules()}
    targets = []
    for block in get_blocks(model):
        if not is_frozen(block):
            continue
        for module in block.modules():
            if isinstance(module, nn.Linear):
                targets.append(QuantTarget(names[id(module)], module.in_features, module.out_features, False))
            elif isinstance(module, Conv1D):
                in_features, out_features = module.weight.shape
                targets.append(QuantTarget(names[id(module)], in_features, out_features, True))
    return targets


def quantized_bytes(model: nn.Module, targets: list[QuantTarget]) -> int:
    """Bytes of the model's weights with ``targets`` in NF4 and everything else in float32."""
    quantised = sum(t.n_weights for t in targets)
    return int((parameter_count(model) - quantised) * 4 + quantised * NF4_BITS_PER_WEIGHT / 8)


def quantize_blockers(device: torch.device) -> list[str]:
    """What stops 4-bit weights on ``device`` (empty when nothing does)."""
    blockers = []
    if device.type != "cuda":
        blockers.append(f"bitsandbytes quantises on CUDA only and the owner computes on {device} (use --device cuda)")
    if importlib.util.find_spec("bitsandbytes") is None:
        blockers.append(f"bitsandbytes is not installed (install the extra: {INSTALL})")
    return blockers


def check_quantize(mode: str, device: torch.device) -> None:
    """Refuse an unknown mode, or ``4bit`` where it cannot run, before any model is built."""
    if mode not in QUANTIZE_CHOICES:
        raise PrivtuneError(f"emulator-quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got {mode!r}")
    blockers = quantize_blockers(device) if mode == "4bit" else []
    if blockers:
        raise PrivtuneError(
            "emulator-quantize=4bit cannot run here: " + "; ".join(blockers) + ". Or set emulator-quantize=none"
        )


def quantize_layers(model: nn.Module, targets: list[QuantTarget], compute_dtype: torch.dtype) -> None:
    """Replace the ``targets`` (:func:`quantization_targets`) by bitsandbytes ``Linear4bit`` (NF4) on the host.

    The weights are quantised when the model moves to CUDA (bitsandbytes does it in ``.to``). The
    layers compute in ``compute_dtype``: float32 under DP-SGD, where the owner computes in float32
    throughout, bf16 under the device's autocast otherwise.
    """
    import bitsandbytes as bnb

    for target in targets:
        parent_name, _, child = target.name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        weight = old.weight.detach().T if target.transposed else old.weight.detach()
        new = bnb.nn.Linear4bit(
            target.in_features,
            target.out_features,
            bias=old.bias is not None,
            compute_dtype=compute_dtype,
            quant_type="nf4",
            device="meta",
        )
        new.weight = bnb.nn.Params4bit(
            weight.contiguous(), requires_grad=False, blocksize=NF4_BLOCK, quant_type="nf4", module=new
        )
        if old.bias is not None:
            new.bias = nn.Parameter(old.bias.detach().clone(), requires_grad=False)
        setattr(parent, child, new)


def place_quantized(policy: DevicePolicy, model: nn.Module, what: str, compute_dtype: torch.dtype) -> nn.Module:
    """``model`` on the policy's CUDA device with its frozen blocks in NF4, after checking it fits there.

    The check counts the quantised layers at NF4's size: :meth:`DevicePolicy.place` would count them
    in float32 and refuse the very emulators this option is for.
    """
    check_quantize("4bit", policy.device)
    targets = quantization_targets(model)
    needed = int(quantized_bytes(model, targets) * 1.2)
    free = available_bytes(policy.device)
    if needed > free:
        raise PrivtuneError(
            f"{what} needs about {needed / 2**30:.1f} GiB on {policy.device} with its frozen blocks in 4 bits, "
            f"but only {free / 2**30:.1f} GiB is free: use a GPU with more memory or a smaller emulator"
        )
    quantize_layers(model, targets, compute_dtype)
    return model.to(policy.device)
