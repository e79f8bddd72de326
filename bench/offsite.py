"""Offsite-tuning on the real SmolLM2-135M (30 blocks): cost of training and quality after training.

Three ways a data owner could fine-tune, same data (Shakespeare blocks) and batch:
  (a) full fine-tuning of the 30-block model,
  (b) the 2-8-2 emulator, training the 4 adapter blocks fully,
  (c) the 2-8-2 emulator with LoRA on the 4 adapter blocks.
Each configuration runs in its own process that loads what that party really holds (the full
model for (a), only the emulator package for (b)/(c)) and trains. Throughput is the median over
the timed optimizer steps (after a warm-up step) of all its processes; the configurations run in
interleaved rounds so that load from other processes on a shared machine spreads over all three.
Peak memory is the process's VmHWM (peak resident set of its own address space). ru_maxrss is not
used: Linux carries the parent's high-water mark across fork+exec, so every child would report at
least the parent's 2 GB. The interpreter + torch baseline is inside the peak, so the increment over
the post-load RSS is reported as well.

Quality: perplexity on held-out Shakespeare of the zero-shot model, the emulator before and after
a short distillation on the public corpus (Milton), emulator + adapter and plug-in after the same
number of training steps, and full fine-tuning for that many steps.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.harness import print_table, write_results

WORKERS = ("full", "adapter", "lora")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.offsite", description=__doc__.splitlines()[0])
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--timed-steps", type=int, default=2, help="timed optimizer steps per process")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of the three processes")
    parser.add_argument("--distill-steps", type=int, default=60)
    parser.add_argument("--distill-lr", type=float, default=3e-4)
    parser.add_argument("--train-steps", type=int, default=20, help="steps for every trained row of the ppl table")
    parser.add_argument("--lr", type=float, default=1e-4, help="full fine-tuning and full adapter blocks")
    parser.add_argument("--lora-lr", type=float, default=1e-3)
    parser.add_argument("--eval-blocks", type=int, default=16)
    parser.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)
    parser.add_argument("--source", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--blocks", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------- one configuration per process
def peak_rss_mb() -> float:
    """Peak resident set of this process's own address space (VmHWM), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmHWM in /proc/self/status (this benchmark needs Linux)")


def worker(args: argparse.Namespace) -> None:
    """Load what the party holds, train ``timed_steps + 1`` steps, print one JSON line."""
    from privtune.common.offsite import EmulatorPackage, TrainConfig, train_adapter
    from privtune.common.offsite.train import shuffled_batches, trainable_parameters

    blocks = torch.load(args.blocks)
    if args.worker == "full":
        from privtune.common.models import load_model

        model = load_model("smollm2").model
        for p in model.parameters():
            p.requires_grad_(True)
        lr = args.lr
    else:
        model = EmulatorPackage.load(args.source).instantiate(seed=0)
        lr = args.lora_lr if args.worker == "lora" else args.lr
    with torch.no_grad():  # page in memory-mapped weights, so the post-load RSS holds the whole model
        sum(float(t.float().sum()) for t in model.state_dict().values())
    rss_loaded = peak_rss_mb()
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=lr)
    batches = shuffled_batches(blocks, args.batch_size, seed=0)
    cfg = TrainConfig(steps=1, batch_size=args.batch_size, lr=lr)
    times = [
        train_adapter(model, blocks, cfg, optimizer=optimizer, batches=batches, progress=False).seconds
        for _ in range(args.timed_steps + 1)
    ]
    print(
        json.dumps(
            {
                "step_seconds": times[1:],
                "warmup_seconds": times[0],
                "peak_rss_mb": peak_rss_mb(),
                "rss_after_load_mb": rss_loaded,
                "trainable_params": sum(p.numel() for p in trainable_parameters(model)),
            }
        )
    )


def run_worker(kind: str, args: argparse.Namespace, source: Path | None, blocks_file: Path) -> dict:
    command = [
        sys.executable,
        "-m",
        "bench.offsite",
        "--worker",
        kind,
        "--blocks",
        str(blocks_file),
        "--block-size",
        str(args.block_size),
        "--batch-size",
        str(args.batch_size),
        "--timed-steps",
        str(args.timed_steps),
        "--lr",
        str(args.lr),
        "--lora-lr",
        str(args.lora_lr),
    ]
    if source is not None:
        command += ["--source", str(source)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    if done.returncode != 0:
        raise RuntimeError(f"worker {kind} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarise(runs: list[dict], tokens_per_step: int) -> dict:
    steps = [s for run in runs for s in run["step_seconds"]]
    step = statistics.median(steps)
    return {
        "tokens_per_s": tokens_per_step / step,
        "step_seconds_median": step,
        "step_seconds": steps,
        "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs),
        "rss_after_load_mb": statistics.median(r["rss_after_load_mb"] for r in runs),
        "trainable_params": runs[0]["trainable_params"],
    }


# ---------------------------------------------------------------------------- analytic FLOP limit
def train_macs_per_token(n_blocks: int, block_macs: int, head_macs: int, trainable_block_macs: int) -> int:
    """Forward + input-gradient pass (2x forward) + weight gradients of the trainable matrices."""
    forward = n_blocks * block_macs + head_macs
    return 2 * forward + trainable_block_macs


def flop_limits(full_model, block_size: int, n_kept: int, n_adapter: int, lora_r: int) -> dict[str, float]:
    from privtune.common.families import get_blocks
    from privtune.common.offsite.adapter import in_out_features, linear_layers

    layers = linear_layers(get_blocks(full_model)[0])
    block_macs = sum(i * o for i, o in map(in_out_features, layers.values()))
    hidden = full_model.config.hidden_size
    block_macs += block_size * hidden  # scores and values over T/2 causal keys on average: 2 * T/2 * hidden
    head_macs = hidden * full_model.config.vocab_size
    n = len(get_blocks(full_model))
    full = train_macs_per_token(n, block_macs, head_macs, n * block_macs + head_macs)
    lora_macs = sum(lora_r * (i + o) for i, o in map(in_out_features, layers.values()))
    adapter = train_macs_per_token(n_kept, block_macs, head_macs, n_adapter * block_macs)
    lora = train_macs_per_token(n_kept, block_macs, head_macs, n_adapter * lora_macs)
    return {
        "head_share_full_forward": head_macs / (n * block_macs + head_macs),
        "head_share_emulator_forward": head_macs / (n_kept * block_macs + head_macs),
        "flop_ratio_adapter": full / adapter,
        "flop_ratio_lora": full / lora,
    }


# ---------------------------------------------------------------------------- the whole benchmark
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    from privtune.common.corpus import public_corpus, shakespeare_works
    from privtune.common.models import load_model
    from privtune.common.offsite import (
        DistillConfig,
        EmulatorPackage,
        OffsiteConfig,
        TrainConfig,
        adapter_manifest,
        adapter_state,
        build_emulator_model,
        distill_emulator,
        perplexity,
        plug_in,
        train_adapter,
    )
    from privtune.common.packing import holdout_split, pack

    began = time.perf_counter()
    load_before = os.getloadavg()[0]
    loaded = load_model("smollm2")
    full, tokenizer = loaded.model, loaded.tokenizer
    private = holdout_split(shakespeare_works(), 0.1)
    n_train = max(args.train_steps, args.timed_steps + 1) * args.batch_size
    train = pack(private.train, tokenizer, args.block_size, max_blocks=n_train)
    heldout = pack(private.heldout, tokenizer, args.block_size, max_blocks=args.eval_blocks)
    public = pack(public_corpus(), tokenizer, args.block_size, max_blocks=max(args.distill_steps, 1) * args.batch_size)

    cfg = OffsiteConfig(k_bottom=2, k_top=2, n_emulator=8, adapter="full")
    lora_cfg = OffsiteConfig(k_bottom=2, k_top=2, n_emulator=8, adapter="lora", lora_r=8, lora_alpha=16)
    emulator = build_emulator_model(full, cfg)
    ppl = {"zero_shot": perplexity(full, heldout, args.batch_size)}
    ppl["emulator_undistilled"] = perplexity(emulator, heldout, args.batch_size)
    distilled = distill_emulator(
        full,
        emulator,
        public,
        DistillConfig(
            steps=args.distill_steps,
            batch_size=args.batch_size,
            lr=args.distill_lr,
            warmup_steps=args.distill_steps // 10,
        ),
    )
    packages = {
        "adapter": EmulatorPackage.build(full, cfg, emulator=emulator),
        "lora": EmulatorPackage.build(full, lora_cfg, emulator=emulator),
    }

    with tempfile.TemporaryDirectory(prefix="bench-offsite-") as tmp:
        blocks_file = Path(tmp) / "blocks.pt"
        torch.save(train, blocks_file)
        folders = {kind: pkg.save(Path(tmp) / kind) for kind, pkg in packages.items()}
        runs: dict[str, list[dict]] = {kind: [] for kind in WORKERS}
        for _ in range(args.rounds):
            for kind in WORKERS:
                runs[kind].append(run_worker(kind, args, folders.get(kind), blocks_file))
    cost = {kind: summarise(rs, args.batch_size * args.block_size) for kind, rs in runs.items()}

    steps_cfg = {"steps": args.train_steps, "batch_size": args.batch_size, "seed": 0, "log_every": 5}
    ppl["emulator"] = perplexity(packages["adapter"].instantiate(), heldout, args.batch_size)
    rows_trained = {}
    for kind, lr in (("adapter", args.lr), ("lora", args.lora_lr)):
        model = packages[kind].instantiate(seed=0)
        rows_trained[kind] = train_adapter(model, train, TrainConfig(lr=lr, **steps_cfg))
        suffix = "" if kind == "adapter" else "_lora"
        ppl[f"emulator_adapter{suffix}"] = perplexity(model, heldout, args.batch_size)
        plugged = plug_in(full, adapter_state(model), adapter_manifest(model))
        ppl[f"plugin{suffix}"] = perplexity(plugged, heldout, args.batch_size)
        del model, plugged
    full_ft = copy.deepcopy(full)
    for p in full_ft.parameters():
        p.requires_grad_(True)
    rows_trained["full_ft"] = train_adapter(full_ft, train, TrainConfig(lr=args.lr, **steps_cfg))
    ppl["full_ft"] = perplexity(full_ft, heldout, args.batch_size)
    del full_ft

    limits = flop_limits(full, args.block_size, n_kept=12, n_adapter=4, lora_r=lora_cfg.lora_r)
    base = cost["full"]
    print_table(
        f"SmolLM2-135M training cost, batch {args.batch_size}x{args.block_size}, fp32, "
        f"{torch.get_num_threads()} threads "
        f"(median of {args.rounds}x{args.timed_steps} steps; peak RSS (VmHWM) per process)",
        ["configuration", "tokens/s", "x full", "peak RSS MB", "x less", "train incr. MB", "trainable"],
        [
            [
                label,
                c["tokens_per_s"],
                c["tokens_per_s"] / base["tokens_per_s"],
                c["peak_rss_mb"],
                base["peak_rss_mb"] / c["peak_rss_mb"],
                c["peak_rss_mb"] - c["rss_after_load_mb"],
                c["trainable_params"],
            ]
            for label, c in (
                ("(a) full fine-tuning", cost["full"]),
                ("(b) 2-8-2 emulator, 4 blocks", cost["adapter"]),
                ("(c) 2-8-2 emulator + LoRA r8", cost["lora"]),
            )
        ],
    )
    print(
        f"analytic FLOP limit: {limits['flop_ratio_adapter']:.2f}x (b), {limits['flop_ratio_lora']:.2f}x (c); "
        f"LM head = {limits['head_share_full_forward']:.0%} of a full forward, "
        f"{limits['head_share_emulator_forward']:.0%} of the emulator's"
    )
    print_table(
        f"perplexity on {len(heldout)}x{args.block_size} held-out Shakespeare tokens "
        f"(distillation {args.distill_steps} steps, training {args.train_steps} steps)",
        ["row", "perplexity"],
        [[k, v] for k, v in ppl.items()],
    )

    write_results(
        "offsite",
        {
            "throughput_ratio_adapter": cost["adapter"]["tokens_per_s"] / base["tokens_per_s"],
            "throughput_ratio_lora": cost["lora"]["tokens_per_s"] / base["tokens_per_s"],
            "memory_ratio_adapter": base["peak_rss_mb"] / cost["adapter"]["peak_rss_mb"],
            "memory_ratio_lora": base["peak_rss_mb"] / cost["lora"]["peak_rss_mb"],
            "memory_increment_ratio_adapter": (base["peak_rss_mb"] - base["rss_after_load_mb"])
            / (cost["adapter"]["peak_rss_mb"] - cost["adapter"]["rss_after_load_mb"]),
            "memory_increment_ratio_lora": (base["peak_rss_mb"] - base["rss_after_load_mb"])
            / (cost["lora"]["peak_rss_mb"] - cost["lora"]["rss_after_load_mb"]),
            "ppl": ppl,
            "cost": cost,
            "analytic": limits,
            "distillation": {
                "steps": distilled.steps,
                "lr": args.distill_lr,
                "corpus": "Milton (public)",
                "lm_first": distilled.lm_losses[:1],
                "lm_last": distilled.lm_losses[-1:],
                "kd_first": distilled.kd_losses[:1],
                "kd_last": distilled.kd_losses[-1:],
                "seconds": distilled.seconds,
            },
            "training": {
                k: {"mean_loss": r.mean_loss, "last_loss": r.last_loss, "seconds": r.seconds}
                for k, r in rows_trained.items()
            },
            "settings": {
                "model": "smollm2 (SmolLM2-135M-Instruct, 30 blocks)",
                "split": "2-8-2",
                "batch": [args.batch_size, args.block_size],
                "dtype": "fp32",
                "timed_steps": args.timed_steps,
                "rounds": args.rounds,
                "distill_steps": args.distill_steps,
                "distill_lr": args.distill_lr,
                "train_steps": args.train_steps,
                "lr": args.lr,
                "lora_lr": args.lora_lr,
                "eval_blocks": args.eval_blocks,
                "memory": "VmHWM (peak RSS) of one process per configuration, median over rounds",
            },
            "load_average_at_start": load_before,
            "load_average_at_end": os.getloadavg()[0],
            "wall_seconds": time.perf_counter() - began,
        },
    )


if __name__ == "__main__":
    main()
