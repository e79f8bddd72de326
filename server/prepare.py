"""``privtune prepare``: the model owner cuts the foundation model into emulator + adapter.

Writes ``DIR/emulator/`` (the package data owners receive), ``DIR/tokenizer/`` (when the model has a
Hugging Face tokenizer: data owners need it to tokenise their text) and ``DIR/model.json``, the
owner's reference to the full model the package came from (the full model is not copied).
Distillation on the public corpus runs by default and resumes from ``DIR/distill.ckpt`` if
interrupted.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from privtune.common.errors import PrivtuneError

PACKAGE_DIR = "emulator"
TOKENIZER_DIR = "tokenizer"
MODEL_REFERENCE = "model.json"
CHECKPOINT = "distill.ckpt"


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
        "--distill-steps", type=int, default=200, help="emulator distillation steps on the public corpus (default 200)"
    )
    distill.add_argument(
        "--no-distill",
        action="store_true",
        help="ablation: ship the layer-dropped emulator undistilled (useless on small models)",
    )
    parser.add_argument("--distill-batch-size", type=int, default=4)
    parser.add_argument("--distill-lr", type=float, default=1e-4)
    parser.add_argument("--lm-weight", type=float, default=1.0)
    parser.add_argument("--kd-weight", type=float, default=30.0)
    parser.add_argument(
        "--public-data",
        type=Path,
        help="folder of .txt/.jsonl public text to distil on (default: the embedded Milton corpus)",
    )
    parser.add_argument("--block-size", type=int, default=256, help="tokens per training block (default 256)")
    parser.add_argument("--seed", type=int, default=0, help="data order of distillation")
    parser.add_argument("-o", "--output", required=True, type=Path, help="output folder")


def run(args: argparse.Namespace) -> int:
    from privtune.common.corpus import local_documents, public_corpus
    from privtune.common.models import load_model
    from privtune.common.offsite import (
        DistillConfig,
        EmulatorPackage,
        OffsiteConfig,
        build_emulator_model,
        distill_emulator,
        middle_kd,
    )
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
    loaded = load_model(args.model)
    full = loaded.model
    emulator = build_emulator_model(full, cfg)
    out: Path = args.output
    out.mkdir(parents=True, exist_ok=True)
    extra = {"distillation": None}
    steps = 0 if args.no_distill else args.distill_steps
    if steps < 0:
        raise PrivtuneError(f"--distill-steps must be >= 0, got {steps}")
    if steps > 0:
        block_size = min(args.block_size, max_positions(full))
        public = local_documents(args.public_data) if args.public_data else public_corpus()
        split = holdout_split(public, 0.02)
        train = pack(split.train, loaded.tokenizer, block_size, max_blocks=steps * args.distill_batch_size)
        heldout = pack(split.heldout, loaded.tokenizer, block_size, max_blocks=8)
        dcfg = DistillConfig(
            steps=steps,
            batch_size=args.distill_batch_size,
            lr=args.distill_lr,
            lm_weight=args.lm_weight,
            kd_weight=args.kd_weight,
            seed=args.seed,
        )
        kd_before = middle_kd(full, emulator, heldout)
        result = distill_emulator(full, emulator, train, dcfg, checkpoint=out / CHECKPOINT)
        kd_after = middle_kd(full, emulator, heldout)
        print(
            f"distillation: {result.steps} steps (resumed at {result.resumed_from}), "
            f"held-out public KD {kd_before:.4f} -> {kd_after:.4f}"
        )
        extra["distillation"] = {
            "corpus": args.public_data.name if args.public_data else "embedded Milton",
            "steps": steps,
            "batch_size": dcfg.batch_size,
            "block_size": block_size,
            "lr": dcfg.lr,
            "lm_weight": dcfg.lm_weight,
            "kd_weight": dcfg.kd_weight,
            "heldout_kd_before": kd_before,
            "heldout_kd_after": kd_after,
        }
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
    (out / CHECKPOINT).unlink(missing_ok=True)
    split = package.split
    print(
        f"emulator package {package.content_hash[:16]}... written to {out / PACKAGE_DIR}: blocks {split.bottom} + "
        f"middle {split.middle_kept} + {split.top} of {split.n_blocks}; adapter {cfg.adapter}"
    )
    return 0


def max_positions(model) -> int:
    config = model.config
    for key in ("max_position_embeddings", "n_positions"):
        if getattr(config, key, None):
            return int(getattr(config, key))
    return 1 << 30
