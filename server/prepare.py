"""``privtune prepare``: the model owner cuts the foundation model into emulator + adapter.

Writes ``DIR/emulator/`` (the package data owners receive), ``DIR/tokenizer/`` (when the model has a
Hugging Face tokenizer: data owners need it to tokenise their text), ``DIR/model.json`` (the owner's
reference to the full model the package came from; the full model is not copied) and, when the
emulator is distilled, ``DIR/distillation.json`` and ``DIR/distillation.png`` (the loss curve).

Distillation on the public corpus is the long step (minutes to hours on a CPU), so it is an
artifact: the distilled middle blocks are cached under the privtune cache, keyed by the full model's
weights, the split, the distillation settings and the token ids it trains on. A second ``prepare``
with the same inputs reuses them in seconds; an interrupted one resumes from its checkpoint in the
same cache folder. The package records the emulator's quality: its perplexity next to the full
model's on held-out public text.

Distillation runs in two stages: ``--distill-steps`` of LM loss + hidden-state KD, then
``--align-steps`` of KD alone (hidden state and next-token logits, no LM loss). The LM term fits the
emulator to the public corpus; the KD-only stage makes it imitate the full model instead, which is
what data owners' adapters need when their text is not like the public corpus (on SmolLM2 2-8-2 it
raised the plug-in's share of full fine-tuning's gain from 0.35 to 0.57 in 1000 steps, README).

Distillation and the quality check compute on ``--device`` (bf16 autocast on CUDA); digests,
the cache and the package are made from the host copies.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from privtune.common.device import DevicePolicy, add_device_argument
from privtune.common.errors import PrivtuneError

DISTILL_STEPS = 1000
ALIGN_STEPS = 1600
"""Both measured on SmolLM2 2-8-2 (README, offsite-tuning): 1000 steps bring the emulator to 1.4x the
full model's public perplexity, and 1600 KD-only steps after them are the first budget at which the
plugged-in LoRA recovers 0.6 of full fine-tuning's gain."""
PACKAGE_DIR = "emulator"
TOKENIZER_DIR = "tokenizer"
MODEL_REFERENCE = "model.json"
DISTILLATION_JSON = "distillation.json"
DISTILLATION_PLOT = "distillation.png"
CACHED_MIDDLE = "middle.safetensors"
CHECKPOINT = "checkpoint"
HELDOUT_BLOCKS = 8


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="tiny-gpt2 | tiny-llama | tiny-opt | smollm2 | HF model folder")
    parser.add_argument("--k-bottom", type=int, default=2, help="bottom blocks in the adapter (default 2)")
    parser.add_argument("--k-top", type=int, default=2, help="top blocks in the adapter (default 2)")
    parser.add_argument("--n-emulator", type=int, default=8, help="middle blocks the emulator keeps (default 8)")
    parser.add_argument(
        "--adapter", choices=("lora", "full"), default="lora", help="what data owners train (default lora)"
    )
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--lora-alpha", type=int, default=16)
    parser.add_argument(
        "--carry-embeddings",
        action="store_true",
        help="ULT mode: the adapter also carries (and trains) the input embedding and LM head",
    )
    distill = parser.add_mutually_exclusive_group()
    distill.add_argument(
        "--distill-steps",
        type=int,
        default=DISTILL_STEPS,
        help=f"emulator distillation steps on the public corpus, LM + hidden KD (default {DISTILL_STEPS})",
    )
    distill.add_argument(
        "--no-distill",
        action="store_true",
        help="ablation: ship the layer-dropped emulator undistilled (useless on small models)",
    )
    parser.add_argument("--distill-batch-size", type=int, default=4)
    parser.add_argument("--distill-lr", type=float, default=3e-4)
    parser.add_argument("--lm-weight", type=float, default=1.0)
    parser.add_argument("--kd-weight", type=float, default=30.0, help="hidden-state KD after the middle")
    parser.add_argument("--logit-kd-weight", type=float, default=0.0, help="KL to the full model's next-token logits")
    parser.add_argument(
        "--middle-lora-r", type=int, default=0, help="distil low-rank updates of the middle blocks (0: the blocks)"
    )
    parser.add_argument(
        "--align-steps",
        type=int,
        default=ALIGN_STEPS,
        help=f"a final distillation stage without the LM loss, hidden + logit KD only (default {ALIGN_STEPS}; 0: none)",
    )
    parser.add_argument(
        "--align-logit-kd-weight", type=float, default=1.0, help="logit KD weight of the alignment stage (default 1)"
    )
    parser.add_argument(
        "--public-data",
        type=Path,
        help="folder of .txt/.jsonl public text to distil on (default: the embedded Milton corpus)",
    )
    parser.add_argument("--block-size", type=int, default=128, help="tokens per distillation block (default 128)")
    parser.add_argument("--seed", type=int, default=0, help="data order of distillation")
    parser.add_argument("--checkpoint-every", type=int, default=50, help="distillation steps between checkpoints")
    parser.add_argument(
        "--distill-cache", type=Path, help="folder of cached distillations (default: the privtune cache)"
    )
    add_device_argument(parser)
    parser.add_argument("-o", "--output", required=True, type=Path, help="output folder")


def run(args: argparse.Namespace) -> int:
    from privtune.common.corpus import local_documents, public_corpus
    from privtune.common.models import load_model
    from privtune.common.offsite import DistillConfig, EmulatorPackage, OffsiteConfig, build_emulator_model
    from privtune.common.offsite.distill import alignment_config
    from privtune.common.offsite.evaluate import emulator_quality
    from privtune.common.packing import holdout_split, pack

    cfg = OffsiteConfig(
        k_bottom=args.k_bottom,
        k_top=args.k_top,
        n_emulator=args.n_emulator,
        adapter=args.adapter,
        lora_r=args.lora_r,
        lora_alpha=args.lora_alpha,
        carry_embeddings=args.carry_embeddings,
    )
    steps = 0 if args.no_distill else args.distill_steps
    if steps < 0:
        raise PrivtuneError(f"--distill-steps must be >= 0, got {steps}")
    policy = DevicePolicy.resolve(args.device)
    print(f"computing on {policy.describe()}")
    loaded = load_model(args.model)
    full = loaded.model
    emulator = build_emulator_model(full, cfg)
    out: Path = args.output
    out.mkdir(parents=True, exist_ok=True)
    block_size = min(args.block_size, max_positions(full))
    public = holdout_split(local_documents(args.public_data) if args.public_data else public_corpus(), 0.02)
    heldout = pack(public.heldout, loaded.tokenizer, block_size, max_blocks=HELDOUT_BLOCKS)
    distillation = None
    if steps > 0:
        dcfg = DistillConfig(
            steps=steps,
            batch_size=args.distill_batch_size,
            lr=args.distill_lr,
            lm_weight=args.lm_weight,
            kd_weight=args.kd_weight,
            logit_kd_weight=args.logit_kd_weight,
            middle_lora_r=args.middle_lora_r,
            warmup_steps=steps // 10,
            seed=args.seed,
            checkpoint_every=args.checkpoint_every,
        )
        align = max(args.align_steps, 0)
        train = pack(public.train, loaded.tokenizer, block_size, max_blocks=(steps + align) * dcfg.batch_size)
        cache = args.distill_cache if args.distill_cache else _default_cache()
        distillation = distil_cached(full, emulator, train, dcfg, cache, policy)
        if align:
            acfg = alignment_config(dcfg, align, args.align_logit_kd_weight)
            aligned = distil_cached(full, emulator, train, acfg, cache, policy)
            distillation["history"] = distillation["history"] + aligned.pop("history")
            distillation["align"] = aligned
        distillation["corpus"] = args.public_data.name if args.public_data else "embedded Milton"
        plot_losses(distillation["history"], out / DISTILLATION_PLOT)
        (out / DISTILLATION_JSON).write_text(json.dumps(distillation, indent=1) + "\n")
    with policy.hosting({args.model: full, "emulator": emulator}):
        quality = emulator_quality(full, emulator, heldout.to(policy.device))
    print(
        f"emulator quality on held-out public text: perplexity {quality['emulator_ppl']:.2f} "
        f"(full model {quality['full_ppl']:.2f}, x{quality['ratio']:.2f})"
    )
    extra = {"distillation": _manifest_entry(distillation), "emulator_quality": quality}
    package = EmulatorPackage.build(full, cfg, emulator=emulator, extra=extra)
    package.save(out / PACKAGE_DIR)
    if hasattr(loaded.tokenizer, "save"):
        loaded.tokenizer.save(out / TOKENIZER_DIR)
    reference = {
        "source": args.model,
        "family": package.manifest["family"],
        "n_blocks": package.split.n_blocks,
        "package_hash": package.content_hash,
        "adapter_base_hash": package.adapter_manifest.base_hash,
    }
    (out / MODEL_REFERENCE).write_text(json.dumps(reference, indent=1) + "\n")
    split = package.split
    size_mb = sum(t.numel() * t.element_size() for t in package.to_parts()[0].values()) / 2**20
    print(
        f"emulator package {package.content_hash[:16]}... ({size_mb:.0f} MB) written to {out / PACKAGE_DIR}: "
        f"blocks {split.bottom} + middle {split.middle_kept} + {split.top} of {split.n_blocks}; adapter {cfg.adapter}"
    )
    return 0


def _default_cache() -> Path:
    from privtune.common.paths import cache_dir

    return cache_dir("distilled")


def _manifest_entry(distillation: dict[str, Any] | None) -> dict[str, Any] | None:
    """What the package manifest keeps of a distillation: settings and endpoints, not the per-step curve."""
    if distillation is None:
        return None
    return {k: v for k, v in distillation.items() if k != "history"}


def distillation_key(full: nn.Module, emulator: nn.Module, train: torch.Tensor, dcfg: Any) -> str:
    """What a cached distillation depends on: the full model's weights, the split, the middle it starts
    from (an alignment stage continues the main one), settings and data."""
    from privtune.common.offsite.digest import tensors_digest
    from privtune.common.offsite.distill import middle_state
    from privtune.common.offsite.split import split_of

    split = split_of(emulator)
    assert split is not None
    weights = tensors_digest(full.state_dict())
    start = tensors_digest(middle_state(emulator))
    extra = {"model": weights, "split": split.to_dict(), "start": start, "config": dcfg.fingerprint()}
    return tensors_digest({"ids": train}, extra)


def distil_cached(
    full: nn.Module,
    emulator: nn.Module,
    train: torch.Tensor,
    dcfg: Any,
    cache: Path,
    policy: DevicePolicy,
) -> dict[str, Any]:
    """Distil ``emulator`` in place, or load the cached result of the same distillation."""
    from safetensors.torch import load_file, save_file

    from privtune.common.checkpoint import remove_checkpoint
    from privtune.common.offsite import distill as distill_loop

    folder = cache / distillation_key(full, emulator, train, dcfg)[:32]
    record_file = folder / DISTILLATION_JSON
    if record_file.exists() and (folder / CACHED_MIDDLE).exists():
        distill_loop.load_middle_state(emulator, load_file(str(folder / CACHED_MIDDLE)))
        record = json.loads(record_file.read_text())
        print(f"distillation: {record['steps']} steps, cached in {folder}")
    else:
        folder.mkdir(parents=True, exist_ok=True)
        with policy.hosting({"full model": full, "emulator": emulator}):
            result = distill_loop.distill_emulator(
                full, emulator, train.to(policy.device), dcfg, checkpoint=folder / CHECKPOINT
            )
        record = {
            "steps": result.steps,
            "resumed_from": result.resumed_from,
            "seconds_this_run": result.seconds,
            "batch_size": dcfg.batch_size,
            "block_size": int(train.shape[1]),
            "lr": dcfg.lr,
            "lm_weight": dcfg.lm_weight,
            "kd_weight": dcfg.kd_weight,
            "logit_kd_weight": dcfg.logit_kd_weight,
            "middle_lora_r": dcfg.middle_lora_r,
            "final_losses": dict(zip(("lm", "kd", "logit_kd"), result.history[-1])),
            "history": result.history,
        }
        tmp = folder / f".{CACHED_MIDDLE}.tmp"
        save_file(distill_loop.middle_state(emulator), str(tmp))
        tmp.replace(folder / CACHED_MIDDLE)
        plot_losses(record["history"], folder / DISTILLATION_PLOT)
        record_file.write_text(json.dumps(record) + "\n")
        remove_checkpoint(folder / CHECKPOINT)
        print(f"distillation: {result.steps} steps (resumed at {result.resumed_from}), cached in {folder}")
    return record


def plot_losses(history: list[list[float]], path: Path) -> Path:
    """The distillation loss curve: LM loss, hidden-state KD and logit KD against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = range(1, len(history) + 1)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    for column, (ax, title) in enumerate(zip(axes, ("LM loss", "hidden-state KD", "logit KD (KL)"))):
        ax.plot(steps, [row[column] for row in history])
        ax.set(title=title, xlabel="step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def max_positions(model: nn.Module) -> int:
    config = model.config
    for key in ("max_position_embeddings", "n_positions"):
        if getattr(config, key, None):
            return int(getattr(config, key))
    return 1 << 30
