"""Offsite-tuning on a GPU: full fine-tuning vs the 2-k-2 emulator + LoRA, throughput and peak CUDA memory.

``python -m bench.offsite_cuda --device cuda --model bench/configs/llama-1b.json`` builds a randomly
initialised LLaMA-style model of about 1.1 B parameters from the config in the repository (no
download); ``--model bench/configs/smollm2-135m.json`` is SmolLM2-135M's architecture with random
weights, ``--model smollm2`` the packaged SmolLM2-135M itself. Both sides train as privtune does on
a GPU (:mod:`privtune.common.device`): float32 trainable weights and optimiser state, forward passes
under bf16 autocast, the same batches of random token ids (throughput and memory do not depend on
what the tokens say). The configurations:
  (a) full fine-tuning as Hugging Face runs it (the whole logit tensor),
  (a') full fine-tuning with privtune's chunked LM head,
  (c) the emulator (2 bottom + ``--n-emulator`` middle + 2 top blocks) with LoRA on the 4 adapter
      blocks, trained as data owners do (chunked head, frozen middle recomputed in the backward),
  (c') with ``--quantize 4bit``, (c) with the frozen middle's linear layers in NF4 (bitsandbytes,
      ``emulator-quantize=4bit``; the extra ``privtune[gpu4bit]``).
Throughput is the median over ``--timed-steps`` optimizer steps after a warm-up step; peak memory is
``torch.cuda.max_memory_allocated`` from an empty device to the end of training (weights, optimiser
state, activations), reset between configurations. A configuration that does not fit is recorded as
out of memory. The paper's figures (GPT2-XL, 2-k-2 emulator + LoRA) are 6.5x the throughput and
5.6x less memory than full fine-tuning.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.harness import print_table, write_results
from privtune.common.offsite.lm import HEAD_CHUNK

CONFIGS_DIR = Path(__file__).resolve().parent / "configs"
K_ADAPTER = 2
"""Adapter blocks at each end (the 2-k-2 split)."""
PAPER = {"throughput_ratio": 6.5, "memory_ratio": 5.6}


@dataclass(frozen=True)
class Setting:
    kind: str
    label: str
    lean: bool
    lr: float


SETTINGS = (
    Setting("full", "full fine-tuning (HF loss)", lean=False, lr=1e-5),
    Setting("full_lean", "full fine-tuning (chunked head)", lean=True, lr=1e-5),
    Setting("lora", "2-k-2 emulator + LoRA", lean=True, lr=1e-3),
)
QUANTIZED = Setting("lora_4bit", "2-k-2 emulator (NF4 middle) + LoRA", lean=True, lr=1e-3)


def settings(quantize: str) -> tuple[Setting, ...]:
    return (*SETTINGS, QUANTIZED) if quantize == "4bit" else SETTINGS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.offsite_cuda", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="a CUDA device: cuda or cuda:N (default cuda)")
    parser.add_argument(
        "--model", default=str(CONFIGS_DIR / "llama-1b.json"), help="a model config .json (random init) or smollm2"
    )
    parser.add_argument("--block-size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--timed-steps", type=int, default=5, help="timed optimizer steps per configuration")
    parser.add_argument("--n-emulator", type=int, help="middle blocks the emulator keeps (default: half of them)")
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument(
        "--head-chunk",
        type=int,
        default=HEAD_CHUNK,
        help=f"tokens per LM-head chunk, chunked-head rows (default {HEAD_CHUNK}; more: fewer kernels, more memory)",
    )
    parser.add_argument(
        "--quantize",
        choices=["none", "4bit"],
        default="none",
        help="4bit: also time the emulator with its frozen middle in NF4 (CUDA, pip install 'privtune[gpu4bit]')",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="offsite_cuda", help="results name under bench/results")
    return parser.parse_args(argv)


def model_config(path: Path | str):
    """A transformers config from a config.json-style file (``model_type`` names the family)."""
    from transformers import AutoConfig

    fields = json.loads(Path(path).read_text())
    model_type = fields.pop("model_type", None)
    if model_type is None:
        raise SystemExit(f"bench.offsite_cuda: {path} has no model_type; it must be a Hugging Face config.json")
    return AutoConfig.for_model(model_type, **fields)


def build_model(source: str, seed: int) -> nn.Module:
    """The full model on the host in float32: random weights from a config file, or a privtune model source."""
    if source.endswith(".json"):
        from transformers import AutoModelForCausalLM

        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(model_config(source), dtype=torch.float32).eval()
    from privtune.common.models import load_model

    return load_model(source).model


def emulator_split(n_blocks: int, n_emulator: int | None) -> dict[str, int]:
    """2 adapter blocks at each end and, by default, half of the middle kept."""
    middle = n_blocks - 2 * K_ADAPTER
    if middle < 1:
        raise SystemExit(f"bench.offsite_cuda: a {n_blocks}-block model has no middle for a 2-k-2 emulator")
    kept = max(1, middle // 2) if n_emulator is None else n_emulator
    return {"k_bottom": K_ADAPTER, "k_top": K_ADAPTER, "n_emulator": kept}


def random_blocks(vocab_size: int, n_blocks: int, block_size: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (n_blocks, block_size), generator=generator)


class Device:
    """What the measurement needs from the device: empty it and reset the peak, read the peak."""

    def __init__(self, policy) -> None:
        self.policy = policy
        self.cuda = policy.device.type == "cuda"

    def empty(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.policy.device)

    def peak_mb(self) -> float | None:
        return torch.cuda.max_memory_allocated(self.policy.device) / 2**20 if self.cuda else None

    def out_of_memory(self) -> type[BaseException]:
        return torch.cuda.OutOfMemoryError if self.cuda else MemoryError


def measure(
    setting: Setting,
    make_model: Callable[[], nn.Module],
    blocks: torch.Tensor,
    args: argparse.Namespace,
    device: Device,
) -> dict[str, Any]:
    """Train one configuration ``timed_steps + 1`` steps on the device; its throughput and peak memory."""
    from privtune.common.errors import PrivtuneError
    from privtune.common.offsite import TrainConfig, train_adapter
    from privtune.common.offsite.train import shuffled_batches, trainable_parameters

    device.empty()
    model = optimizer = None
    try:
        model = device.policy.place(make_model(), setting.label)
        optimizer = torch.optim.AdamW(trainable_parameters(model), lr=setting.lr)
        on_device = blocks.to(device.policy.device)
        batches = shuffled_batches(on_device, args.batch_size, seed=args.seed)
        cfg = TrainConfig(
            steps=1, batch_size=args.batch_size, lr=setting.lr, lean=setting.lean, head_chunk=args.head_chunk
        )
        with device.policy.autocast():
            results = [
                train_adapter(model, on_device, cfg, optimizer=optimizer, batches=batches, progress=False)
                for _ in range(args.timed_steps + 1)
            ]
    except (device.out_of_memory(), PrivtuneError) as err:  # PrivtuneError: check_fits refused the weights
        return {"label": setting.label, "out_of_memory": True, "peak_mb": device.peak_mb(), "error": str(err)[:300]}
    finally:
        del model, optimizer
    seconds = statistics.median(r.seconds for r in results[1:])
    return {
        "label": setting.label,
        "out_of_memory": False,
        "tokens_per_s": args.batch_size * args.block_size / seconds,
        "step_seconds_median": seconds,
        "warmup_seconds": results[0].seconds,
        "peak_mb": device.peak_mb(),
        "last_loss": results[-1].last_loss,
    }


def run_settings(full: nn.Module, blocks: torch.Tensor, args: argparse.Namespace, device: Device) -> dict[str, dict]:
    """Every configuration on the same blocks; LoRA first, so a full fine-tuning that does not fit
    cannot leave the allocator fragmented for it."""
    import copy

    from privtune.common.families import num_blocks
    from privtune.common.offsite import EmulatorPackage, OffsiteConfig

    split = emulator_split(num_blocks(full), args.n_emulator)
    offsite = OffsiteConfig(**split, adapter="lora", lora_r=args.lora_r, lora_alpha=2 * args.lora_r)
    package = EmulatorPackage.build(full, offsite)

    def full_trainable() -> nn.Module:
        model = copy.deepcopy(full)
        model.requires_grad_(True)
        return model

    def quantized() -> nn.Module:
        from privtune.common.offsite.quantize import quantization_targets, quantize_layers

        model = package.instantiate(seed=args.seed)
        quantize_layers(model, quantization_targets(model), compute_dtype=torch.bfloat16)
        return model  # quantised when measure() moves it to CUDA

    makers = {
        "lora": lambda: package.instantiate(seed=args.seed),
        "lora_4bit": quantized,
        "full": full_trainable,
        "full_lean": full_trainable,
    }
    order = sorted(settings(args.quantize), key=lambda s: not s.kind.startswith("lora"))
    results = {s.kind: measure(s, makers[s.kind], blocks, args, device) for s in order}
    results["lora"]["split"] = split
    return results


def ratios(results: dict[str, dict]) -> dict[str, float | None]:
    """Each LoRA configuration over each baseline: throughput x and memory / (None where one did not fit)."""
    pairs = [("lora", "full"), ("lora", "full_lean")]
    if "lora_4bit" in results:
        pairs += [("lora_4bit", "full"), ("lora_4bit", "full_lean"), ("lora_4bit", "lora")]
    out: dict[str, float | None] = {}
    for kind, baseline in pairs:
        fast, base = results[kind], results[baseline]
        both = not base["out_of_memory"] and not fast["out_of_memory"] and base["peak_mb"] and fast["peak_mb"]
        out[f"throughput_ratio_{kind}_over_{baseline}"] = fast["tokens_per_s"] / base["tokens_per_s"] if both else None
        out[f"memory_ratio_{baseline}_over_{kind}"] = base["peak_mb"] / fast["peak_mb"] if both else None
    return out


def cuda_policy(spec: str):
    """The device policy, or a message saying why this benchmark cannot run here."""
    from privtune.common.device import DevicePolicy
    from privtune.common.errors import PrivtuneError

    try:
        policy = DevicePolicy.resolve(spec)
    except PrivtuneError as err:
        raise SystemExit(f"bench.offsite_cuda needs a CUDA GPU: {err}") from None
    if policy.device.type != "cuda":
        raise SystemExit(
            f"bench.offsite_cuda measures CUDA memory and runs on a GPU only; --device {spec} is {policy.device} "
            "(give --device cuda on a machine with an NVIDIA GPU and a CUDA build of torch)"
        )
    if not policy.mixed_precision:
        raise SystemExit(f"bench.offsite_cuda compares bf16 training; {policy.describe()} has no bf16 support")
    return policy


def check_quantize_here(quantize: str, policy) -> None:
    from privtune.common.errors import PrivtuneError
    from privtune.common.offsite.quantize import check_quantize

    try:
        check_quantize(quantize, policy.device)
    except PrivtuneError as err:
        raise SystemExit(f"bench.offsite_cuda --quantize {quantize}: {err}") from None


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    policy = cuda_policy(args.device)
    check_quantize_here(args.quantize, policy)
    device = Device(policy)
    from bench.offsite import flop_limits, model_size

    full = build_model(args.model, args.seed)
    vocab_size = int(full.config.vocab_size)  # type: ignore[union-attr,arg-type]  # a transformers config
    blocks = random_blocks(vocab_size, args.batch_size * (args.timed_steps + 1), args.block_size, args.seed)
    results = run_settings(full, blocks, args, device)
    split = results["lora"]["split"]
    n_adapter = split["k_bottom"] + split["k_top"]
    figures = {
        "device": policy.describe(),
        "gpu": torch.cuda.get_device_name(policy.device),
        "model": args.model,
        "model_size": model_size(full),
        "settings": {k: v for k, v in vars(args).items() if k != "output"},
        "results": results,
        "ratios": ratios(results),
        "flop_limits": flop_limits(full, args.block_size, split["n_emulator"] + n_adapter, n_adapter, args.lora_r),
        "paper_gpt2_xl": PAPER,
    }
    rows = [
        [r["label"], "out of memory" if r["out_of_memory"] else r["tokens_per_s"], r["peak_mb"]]
        for r in results.values()
    ]
    print_table(f"{args.model} on {policy.describe()}", ["configuration", "tokens/s", "peak MiB"], rows)
    print_table("LoRA vs full fine-tuning", ["ratio", "value"], [[k, v] for k, v in figures["ratios"].items()])
    write_results(args.output, figures)


if __name__ == "__main__":
    main()
