"""Offsite-tuning on the real SmolLM2-135M (30 blocks): cost of training and quality after training.

Cost. Ways a data owner could fine-tune, same data (Shakespeare blocks) and batch:
  (a) full fine-tuning of the 30-block model as Hugging Face runs it (the whole logit tensor),
  (a') the same with the chunked LM head (:func:`lean_lm_loss`), to separate what the head saves,
  (b) the 2-8-2 emulator, training the 4 adapter blocks fully,
  (c) the 2-8-2 emulator with LoRA on the 4 adapter blocks,
  (d) (c) with the adapter blocks checkpointed too (``gradient-checkpointing``: recomputed in the
      backward, so no block keeps its inside activations).
(b)-(d) train as data owners do: chunked LM head, frozen middle recomputed in the backward.
Each configuration runs in its own process that loads what that party really holds (the full
model for (a), only the emulator package for (b)-(d)) and trains. Throughput is the median over
the timed optimizer steps (after a warm-up step) of all its processes; the configurations run in
interleaved rounds so that load from other processes on a shared machine spreads over them.
Peak memory is the process's VmHWM (peak resident set of its own address space). ru_maxrss is not
used: Linux carries the parent's high-water mark across fork+exec, so every child would report at
least the parent's 2 GB. The interpreter with torch and transformers imported (measured before the
model loads) is inside every peak; ``memory_ratio_*_over_runtime`` compares the peaks above it.

Quality: perplexity on held-out Shakespeare of the zero-shot model, full fine-tuning, and, for
each distillation budget (a separate distillation of that many steps on the public corpus, Milton),
the emulator alone, emulator + LoRA adapter and the plug-in. ``plugin_gain_recovered`` =
(zero-shot - plug-in) / (zero-shot - full fine-tuning). The budgets are stages of one distillation
(each continues the cached previous one, see :func:`distilled_stages`), so a longer curve resumes
instead of starting over. The ceiling is the same LoRA trained on the full model itself (a perfect
emulator); the data owners' recipe (learning rate, rank) is swept on the full model and at the
largest budget, so ``plugin_over_ceiling`` compares like with like.
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
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from bench.harness import RESULTS_DIR, print_table, write_results

WORKERS = ("full", "full_lean", "adapter", "lora", "lora_ckpt")
PACKAGE_OF = {"adapter": "adapter", "lora": "lora", "lora_ckpt": "lora"}
"""Which emulator package each emulator worker loads."""
MMAP_THRESHOLD = 128 * 1024
"""Workers allocate every block over 128 KiB with mmap, so a freed tensor goes back to the system.

glibc otherwise raises its threshold after the first large free and serves later tensors from the
heap, where freed memory stays resident: the LoRA worker's peak was 1080 MB with the default and
876 MB with this fixed threshold, for the same live tensors. All configurations run under it."""
SPLIT = {"k_bottom": 2, "k_top": 2, "n_emulator": 8}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.offsite", description=__doc__.splitlines()[0])
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--timed-steps", type=int, default=2, help="timed optimizer steps per process")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of the cost processes")
    parser.add_argument("--distill-budgets", default="0,60,300", help="distillation steps, comma-separated")
    parser.add_argument("--distill-lr", type=float, default=3e-4)
    parser.add_argument("--kd-weight", type=float, default=30.0)
    parser.add_argument("--logit-kd-weight", type=float, default=0.0)
    parser.add_argument("--middle-lora-r", type=int, default=0)
    parser.add_argument(
        "--align-budgets",
        default="",
        help="steps of a KD-only alignment stage (no LM loss, logit KD) after the largest budget, comma-separated",
    )
    parser.add_argument("--align-logit-kd-weight", type=float, default=1.0)
    parser.add_argument("--train-steps", type=int, default=20, help="steps for every trained row of the ppl table")
    parser.add_argument("--lr", type=float, default=1e-4, help="full fine-tuning and full adapter blocks")
    parser.add_argument(
        "--lora-lr",
        type=float,
        default=3e-3,
        help="data owners' LoRA rate (swept: ceiling 0.86 of full FT, 1e-3: 0.64)",
    )
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument(
        "--compare-variants",
        action="store_true",
        help="at the largest budget, also distil with logit KD, and with logit KD + middle LoRA",
    )
    parser.add_argument(
        "--sweep-lrs",
        default="",
        help="LoRA learning rates swept on the full model (ceiling) and at the largest budget",
    )
    parser.add_argument("--sweep-ranks", default="", help="LoRA ranks swept with --sweep-lrs")
    parser.add_argument("--eval-blocks", type=int, default=16)
    parser.add_argument("--skip-cost", action="store_true", help="quality only (no cost processes)")
    parser.add_argument("--skip-quality", action="store_true", help="cost only (no perplexity measurements)")
    parser.add_argument("--output", default="offsite", help="results name under bench/results")
    parser.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)
    parser.add_argument("--source", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--blocks", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _numbers(text: str, kind: type) -> list[Any]:
    return [kind(x) for x in text.split(",") if x.strip()]


# ---------------------------------------------------------------------------- one configuration per process
def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no {key} in /proc/self/status (this benchmark needs Linux)")


def peak_rss_mb() -> float:
    """Peak resident set of this process's own address space (VmHWM), in MiB."""
    return _status_mb("VmHWM")


def worker(args: argparse.Namespace) -> None:
    """Load what the party holds, train ``timed_steps + 1`` steps, print one JSON line."""
    import transformers  # noqa: F401  (inside the runtime baseline, as the model classes below)
    from transformers import AutoModelForCausalLM  # noqa: F401

    from privtune.common.offsite import EmulatorPackage, TrainConfig, train_adapter
    from privtune.common.offsite.train import shuffled_batches, trainable_parameters

    blocks = torch.load(args.blocks)
    rss_runtime = _status_mb("VmRSS")
    if args.worker in ("full", "full_lean"):
        from privtune.common.models import load_model

        model = load_model("smollm2").model
        for p in model.parameters():
            p.requires_grad_(True)
        lr = args.lr
    else:
        model = EmulatorPackage.load(args.source).instantiate(seed=0)
        lr = args.lora_lr if args.worker.startswith("lora") else args.lr
    with torch.no_grad():  # page in memory-mapped weights, so the post-load RSS holds the whole model
        sum(float(t.float().sum()) for t in model.state_dict().values())
    rss_loaded = peak_rss_mb()
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=lr)
    batches = shuffled_batches(blocks, args.batch_size, seed=0)
    cfg = TrainConfig(
        steps=1,
        batch_size=args.batch_size,
        lr=lr,
        lean=args.worker != "full",
        gradient_checkpointing=args.worker == "lora_ckpt",
    )
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
                "rss_runtime_mb": rss_runtime,
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
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(command, capture_output=True, text=True, cwd=root, env=env)
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
        "rss_runtime_mb": statistics.median(r["rss_runtime_mb"] for r in runs),
        "rss_after_load_mb": statistics.median(r["rss_after_load_mb"] for r in runs),
        "trainable_params": runs[0]["trainable_params"],
    }


def measure_cost(args: argparse.Namespace, full, emulator, train: torch.Tensor) -> dict[str, dict]:
    from privtune.common.offsite import EmulatorPackage, OffsiteConfig

    packages = {
        "adapter": EmulatorPackage.build(full, OffsiteConfig(**SPLIT, adapter="full"), emulator=emulator),
        "lora": EmulatorPackage.build(
            full,
            OffsiteConfig(**SPLIT, adapter="lora", lora_r=args.lora_r, lora_alpha=2 * args.lora_r),
            emulator=emulator,
        ),
    }
    with tempfile.TemporaryDirectory(prefix="bench-offsite-") as tmp:
        blocks_file = Path(tmp) / "blocks.pt"
        torch.save(train, blocks_file)
        folders = {kind: pkg.save(Path(tmp) / kind) for kind, pkg in packages.items()}
        runs: dict[str, list[dict]] = {kind: [] for kind in WORKERS}
        for _ in range(args.rounds):
            for kind in WORKERS:
                runs[kind].append(run_worker(kind, args, folders.get(PACKAGE_OF.get(kind, "")), blocks_file))
    return {kind: summarise(rs, args.batch_size * args.block_size) for kind, rs in runs.items()}


META = {"settings", "machine", "command", "measured_at", "wall_seconds", "complete", "size", "carried"}
"""Keys of a results file that describe its run rather than a measurement."""


def is_cost_figure(key: str) -> bool:
    return key in ("cost", "analytic") or key.startswith(("memory_ratio_", "throughput_ratio_"))


def carried(args: argparse.Namespace) -> dict[str, Any]:
    """The half of the existing results file that ``--skip-cost`` / ``--skip-quality`` does not measure again,
    with the command and settings it was measured under, so one half can be re-run without losing the other."""
    path = RESULTS_DIR / f"{args.output}.json"
    if not (args.skip_cost or args.skip_quality) or not path.exists():
        return {}
    old = json.loads(path.read_text())
    keep = {
        k: v
        for k, v in old.items()
        if k not in META and not k.startswith("load_average") and is_cost_figure(k) == args.skip_cost
    }
    source = {k: old.get(k) for k in ("command", "measured_at", "settings", "complete")}
    return {**keep, "carried": {**source, "figures": sorted(keep)}}


def memory_ratios(cost: dict[str, dict]) -> dict[str, float]:
    base = cost["full"]
    ratios = {}
    for kind in WORKERS[1:]:
        c = cost[kind]
        ratios[f"memory_ratio_{kind}"] = base["peak_rss_mb"] / c["peak_rss_mb"]
        ratios[f"memory_ratio_{kind}_over_runtime"] = (base["peak_rss_mb"] - base["rss_runtime_mb"]) / (
            c["peak_rss_mb"] - c["rss_runtime_mb"]
        )
        ratios[f"throughput_ratio_{kind}"] = c["tokens_per_s"] / base["tokens_per_s"]
    return ratios


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


# ---------------------------------------------------------------------------- quality
@dataclass(frozen=True)
class Recipe:
    """What a data owner trains: adapter kind, steps, learning rate, LoRA rank (alpha = 2 r)."""

    adapter: str
    steps: int
    lr: float
    lora_r: int = 8

    def offsite(self):
        from privtune.common.offsite import OffsiteConfig

        return OffsiteConfig(**SPLIT, adapter=self.adapter, lora_r=self.lora_r, lora_alpha=2 * self.lora_r)


def gain_recovered(zero_shot: float, tuned: float, full_ft: float) -> float:
    return (zero_shot - tuned) / (zero_shot - full_ft)


def transfer(full, emulator, recipe: Recipe, data: dict[str, torch.Tensor], batch: int) -> dict:
    """Train ``recipe`` on the emulator, plug it into ``full``: perplexities (test blocks, and the
    plug-in's on the validation blocks that choose the recipe) and seconds."""
    from privtune.common.offsite import (
        EmulatorPackage,
        TrainConfig,
        adapter_manifest,
        adapter_state,
        perplexity,
        plug_in,
        train_adapter,
    )

    model = EmulatorPackage.build(full, recipe.offsite(), emulator=emulator).instantiate(seed=0)
    trained = train_adapter(
        model, data["train"], TrainConfig(steps=recipe.steps, batch_size=batch, lr=recipe.lr, seed=0), progress=False
    )
    plugged = plug_in(full, adapter_state(model), adapter_manifest(model))
    return {
        "emulator_adapter": perplexity(model, data["heldout"], batch),
        "plugin": perplexity(plugged, data["heldout"], batch),
        "plugin_validation": perplexity(plugged, data["validation"], batch),
        "train_seconds": trained.seconds,
        "last_loss": trained.last_loss,
    }


def ceiling(full, recipe: Recipe, train: torch.Tensor, heldout: torch.Tensor, batch: int) -> float:
    """Perplexity of the recipe's adapter trained on the full model itself: what a perfect emulator gives."""
    from privtune.common.offsite import TrainConfig, perplexity, prepare_adapter, train_adapter

    model = prepare_adapter(copy.deepcopy(full), recipe.offsite(), seed=0)
    train_adapter(model, train, TrainConfig(steps=recipe.steps, batch_size=batch, lr=recipe.lr, seed=0), progress=False)
    return perplexity(model, heldout, batch)


VARIANTS = {
    "hidden KD": {"logit_kd_weight": 0.0, "middle_lora_r": 0},
    "hidden + logit KD": {"logit_kd_weight": 1.0, "middle_lora_r": 0},
    "hidden + logit KD, middle LoRA r16": {"logit_kd_weight": 1.0, "middle_lora_r": 16, "lr": 1e-3},
}
"""Distillation variants of ``--compare-variants`` (LoRA updates take a larger learning rate)."""


def distill_settings(args: argparse.Namespace, variant: dict[str, Any] | None = None) -> dict[str, Any]:
    settings = {"lr": args.distill_lr, "logit_kd_weight": args.logit_kd_weight, "middle_lora_r": args.middle_lora_r}
    return {**settings, "kd_weight": args.kd_weight, "batch_size": args.batch_size, **(variant or {})}


def distilled_stages(
    full, public: torch.Tensor, budgets: list[int], args: argparse.Namespace, variant: dict[str, Any] | None = None
) -> Iterator[tuple[int, Any, float]]:
    """(steps, emulator, cumulative seconds) for each budget, one distillation continued from budget to budget.

    Each stage runs the increment over the previous budget with its own 10% warmup and cosine decay
    (a warm restart), so every point of the curve is an annealed emulator and a larger budget resumes
    from the cached smaller one instead of starting over. Stages are cached under the privtune cache
    (the middle blocks and the seconds they took), keyed by model, split, settings and data; a stage
    stopped midway resumes from its checkpoint (its seconds then count only the resumed part).
    """
    from privtune.common.offsite import OffsiteConfig, build_emulator_model

    emulator = build_emulator_model(full, OffsiteConfig(**SPLIT))
    settings = distill_settings(args, variant)
    yield from _stages(full, emulator, public, budgets, settings, stages_folder(full, public, settings))


def aligned_stages(
    full, emulator, public: torch.Tensor, start: tuple[int, float], budgets: list[int], args: argparse.Namespace
) -> Iterator[tuple[int, Any, float]]:
    """The alignment stages that continue ``emulator`` (the main curve's last point, ``start`` = its
    steps and seconds), with the loss weights of ``privtune prepare``'s
    :func:`~privtune.common.offsite.distill.alignment_config`."""
    from privtune.common.offsite.distill import DistillConfig, alignment_config

    done, seconds = start
    base = distill_settings(args)
    recipe = alignment_config(DistillConfig(**base), 1, args.align_logit_kd_weight)
    settings = {**base, "lm_weight": recipe.lm_weight, "logit_kd_weight": recipe.logit_kd_weight}
    folder = stages_folder(full, public, base) / f"align-from-{done}-{_digest(settings)[:12]}"
    cumulative = [done + steps for steps in budgets]
    yield from _stages(full, emulator, public, cumulative, settings, folder, done, seconds)


def _digest(settings: dict[str, Any]) -> str:
    from privtune.common.offsite.digest import tensors_digest

    return tensors_digest({}, settings)


def stages_folder(full, public: torch.Tensor, settings: dict[str, Any]) -> Path:
    from privtune.common.offsite.digest import tensors_digest
    from privtune.common.paths import cache_dir

    model = tensors_digest(full.state_dict())
    return cache_dir(
        "bench-offsite", tensors_digest({"ids": public}, {"model": model, "split": SPLIT, "settings": settings})[:24]
    )


def _stages(
    full,
    emulator,
    public: torch.Tensor,
    budgets: list[int],
    settings: dict[str, Any],
    folder: Path,
    done: int = 0,
    seconds: float = 0.0,
) -> Iterator[tuple[int, Any, float]]:
    from privtune.common.checkpoint import remove_checkpoint
    from privtune.common.offsite import DistillConfig, distill_emulator
    from privtune.common.offsite.distill import load_middle_state, middle_state

    folder.mkdir(parents=True, exist_ok=True)
    for steps in sorted(set(budgets)):
        cached = folder / f"{steps}.pt"
        if cached.exists():
            saved = torch.load(cached)
            load_middle_state(emulator, saved["middle"])
            seconds = saved["seconds"]
        elif steps > done:
            increment = steps - done
            dcfg = DistillConfig(steps=increment, warmup_steps=max(1, increment // 10), seed=done, **settings)
            partial = folder / f"{steps}.checkpoint"
            seconds += distill_emulator(full, emulator, public, dcfg, checkpoint=partial, progress=False).seconds
            torch.save({"middle": middle_state(emulator), "seconds": seconds}, cached)
            remove_checkpoint(partial)
        done = steps
        yield steps, emulator, seconds


# ---------------------------------------------------------------------------- the whole benchmark
def quality_point(full, emulator, lora: Recipe, data: dict[str, torch.Tensor], batch: int, refs: dict) -> dict:
    from privtune.common.offsite import perplexity
    from privtune.common.offsite.evaluate import emulator_quality

    point = {
        "emulator": perplexity(emulator, data["heldout"], batch),
        "public": emulator_quality(full, emulator, data["public_heldout"], batch),
        "lora": transfer(full, emulator, lora, data, batch),
    }
    point["plugin_gain_recovered_lora"] = gain_recovered(refs["zero_shot"], point["lora"]["plugin"], refs["full_ft"])
    print(json.dumps(point), flush=True)
    return point


def main(argv: list[str] | None = None) -> None:
    """Stages in order of what matters most; the results file is rewritten after each (``complete`` at the end)."""
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    from privtune.common.corpus import public_corpus, shakespeare_works
    from privtune.common.models import load_model
    from privtune.common.offsite import OffsiteConfig, TrainConfig, build_emulator_model, perplexity, train_adapter
    from privtune.common.packing import holdout_split, pack

    began = time.perf_counter()
    loaded = load_model("smollm2")
    full, tokenizer = loaded.model, loaded.tokenizer
    private = holdout_split(shakespeare_works(), 0.1)
    budgets = _numbers(args.distill_budgets, int)
    align = _numbers(args.align_budgets, int)
    public_split = holdout_split(public_corpus(), 0.02)
    batch = args.batch_size
    data = {
        "train": pack(private.train, tokenizer, args.block_size, max_blocks=max(args.train_steps, 3) * batch),
        "heldout": pack(private.heldout, tokenizer, args.block_size, max_blocks=args.eval_blocks),
        # The recipe is chosen on other works than the test blocks come from (those are the first held-out work's).
        "validation": pack(private.heldout[::-1], tokenizer, args.block_size, max_blocks=args.eval_blocks),
        "public": pack(public_split.train, tokenizer, args.block_size),
        "public_heldout": pack(public_split.heldout, tokenizer, args.block_size, max_blocks=args.eval_blocks),
    }
    results: dict[str, Any] = {
        **carried(args),
        "settings": settings(args),
        "load_average_at_start": os.getloadavg()[0],
        "size": {"full": model_size(full), "emulator": model_size(build_emulator_model(full, OffsiteConfig(**SPLIT)))},
    }

    def stage(**figures: Any) -> None:
        results.update(figures)
        results["wall_seconds"] = time.perf_counter() - began
        results["load_average_at_end"] = os.getloadavg()[0]
        write_results(args.output, {**results, "complete": False})

    if not args.skip_cost:  # cost does not depend on the emulator's weights
        cost = measure_cost(args, full, build_emulator_model(full, OffsiteConfig(**SPLIT)), data["train"])
        limits = flop_limits(full, args.block_size, n_kept=12, n_adapter=4, lora_r=args.lora_r)
        report_cost(args, cost, limits)
        stage(**memory_ratios(cost), cost=cost, analytic=limits)
    if args.skip_quality:
        write_results(args.output, {**results, "complete": True})
        return

    refs = {"zero_shot": perplexity(full, data["heldout"], batch)}
    full_ft_model = copy.deepcopy(full)
    for p in full_ft_model.parameters():
        p.requires_grad_(True)
    tcfg = TrainConfig(steps=args.train_steps, batch_size=batch, lr=args.lr, seed=0, lean=False)
    full_ft_run = train_adapter(full_ft_model, data["train"], tcfg, progress=False)
    refs["full_ft"] = perplexity(full_ft_model, data["heldout"], batch)
    del full_ft_model
    stage(ppl=dict(refs), training={"full_ft": {"last_loss": full_ft_run.last_loss, "seconds": full_ft_run.seconds}})

    lora = Recipe("lora", args.train_steps, args.lora_lr, args.lora_r)
    recipes = [lora] + [r for r in swept_recipes(args) if r != lora]
    ceilings: dict[Recipe, float] = {}
    for recipe in recipes:
        ceilings[recipe] = ceiling(full, recipe, data["train"], data["heldout"], batch)
        ceiling_sweep = [
            {"recipe": asdict(r), "ppl": v, "gain_recovered": gain_recovered(refs["zero_shot"], v, refs["full_ft"])}
            for r, v in ceilings.items()
        ]
        print(json.dumps(ceiling_sweep[-1]), flush=True)
        stage(ceiling_sweep=ceiling_sweep)
    refs["ceiling_lora"] = ceilings[lora]
    ceiling_gain = gain_recovered(refs["zero_shot"], refs["ceiling_lora"], refs["full_ft"])
    stage(ppl=dict(refs), ceiling_gain_recovered_lora=ceiling_gain)

    curve: list[dict[str, Any]] = []

    def point(steps: int, emulator, seconds: float, kind: str) -> None:
        curve.append({"distill_steps": steps, "distill_seconds": seconds, "stage": kind})
        curve[-1].update(quality_point(full, emulator, lora, data, batch, refs))
        curve[-1]["plugin_over_ceiling_lora"] = curve[-1]["plugin_gain_recovered_lora"] / ceiling_gain
        stage(
            curve=curve,
            budget={
                "distill_steps": [p["distill_steps"] for p in curve],
                "distill_seconds": [p["distill_seconds"] for p in curve],
                "distill_batch": [batch, args.block_size],
                "schedule": "each budget continues the previous one: 10% warmup, cosine over the increment",
                "cores": os.cpu_count(),
                "load_average": os.getloadavg()[0],
            },
            plugin_gain_recovered_lora=curve[-1]["plugin_gain_recovered_lora"],
            plugin_over_ceiling_lora=curve[-1]["plugin_over_ceiling_lora"],
        )

    emulator = None
    for steps, emulator, seconds in distilled_stages(full, data["public"], budgets, args):
        point(steps, emulator, seconds, "LM + KD")
    assert emulator is not None
    start = (curve[-1]["distill_steps"], curve[-1]["distill_seconds"])
    for steps, aligned, seconds in aligned_stages(full, emulator, data["public"], start, align, args):
        point(steps, aligned, seconds, "KD only (alignment)")
    last = curve[-1]
    sweep = []
    for recipe in recipes[1:]:
        result = transfer(full, emulator, recipe, data, batch)
        result["plugin_gain_recovered"] = gain_recovered(refs["zero_shot"], result["plugin"], refs["full_ft"])
        result["ceiling"] = ceilings[recipe]
        ceiling_recipe = gain_recovered(refs["zero_shot"], ceilings[recipe], refs["full_ft"])
        result["plugin_over_ceiling"] = result["plugin_gain_recovered"] / ceiling_recipe
        sweep.append({"recipe": asdict(recipe), **result})
        print(json.dumps(sweep[-1]), flush=True)
        stage(sweep=sweep)
    selection = select_recipe(lora, last, sweep) if sweep else None
    stage(selection=selection)

    last["adapter"] = transfer(full, emulator, Recipe("full", args.train_steps, args.lr), data, batch)
    last["plugin_gain_recovered"] = gain_recovered(refs["zero_shot"], last["adapter"]["plugin"], refs["full_ft"])
    ppl = {
        **refs,
        "emulator": last["emulator"],
        "emulator_adapter": last["adapter"]["emulator_adapter"],
        "plugin": last["adapter"]["plugin"],
        "emulator_adapter_lora": last["lora"]["emulator_adapter"],
        "plugin_lora": last["lora"]["plugin"],
    }
    stage(curve=curve, ppl=ppl, plugin_gain_recovered=last["plugin_gain_recovered"])
    variants = compare_variants(args, full, budgets, last, lora, data, refs) if args.compare_variants else []
    stage(variants=variants)
    report_quality(args, refs, curve, variants, sweep, selection)
    results["complete"] = True
    write_results(args.output, results)


def select_recipe(default: Recipe, point: dict, sweep: list[dict]) -> dict[str, Any]:
    """The owners' recipe picked by the plug-in's perplexity on the validation blocks, and its test figure.

    The test blocks never take part in the choice, so the figure reported for the chosen recipe is
    not the best of several draws on the text it is scored on."""
    candidates = [
        {"recipe": asdict(default), **point["lora"], "plugin_gain_recovered": point["plugin_gain_recovered_lora"]}
    ]
    candidates += sweep
    chosen = min(candidates, key=lambda c: c["plugin_validation"])
    return {
        "by": "plug-in perplexity on validation blocks from other held-out works than the test blocks",
        "candidates": [
            {k: c[k] for k in ("recipe", "plugin_validation", "plugin", "plugin_gain_recovered")} for c in candidates
        ],
        "recipe": chosen["recipe"],
        "plugin": chosen["plugin"],
        "plugin_gain_recovered": chosen["plugin_gain_recovered"],
    }


def swept_recipes(args: argparse.Namespace) -> list[Recipe]:
    return [
        Recipe("lora", args.train_steps, lr, rank)
        for lr in _numbers(args.sweep_lrs, float)
        for rank in _numbers(args.sweep_ranks, int) or [args.lora_r]
    ]


def compare_variants(
    args: argparse.Namespace, full, budgets: list[int], point: dict, lora: Recipe, data: dict, refs: dict
) -> list[dict[str, Any]]:
    """The distillation variants at the largest budget; the one the curve already ran is taken from it."""
    variants = []
    current = {"logit_kd_weight": args.logit_kd_weight, "middle_lora_r": args.middle_lora_r, "lr": args.distill_lr}
    for name, variant in VARIANTS.items():
        entry: dict[str, Any] = {"variant": name, "settings": variant, "distill_steps": point["distill_steps"]}
        if {**current, **variant} == current:
            entry.update({k: point[k] for k in point if k != "distill_steps"})
        else:
            *_, (_, candidate, seconds) = distilled_stages(full, data["public"], budgets, args, variant)
            entry["distill_seconds"] = seconds
            entry.update(quality_point(full, candidate, lora, data, args.batch_size, refs))
        variants.append(entry)
    return variants


def model_size(model) -> dict[str, float]:
    """Parameters (tied ones once) and their fp32 megabytes."""
    params = sum(p.numel() for p in model.parameters())
    return {"params": params, "mb": params * 4 / 2**20}


def settings(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "model": "smollm2 (SmolLM2-135M-Instruct, 30 blocks)",
        "split": "2-8-2",
        "batch": [args.batch_size, args.block_size],
        "dtype": "fp32",
        "timed_steps": args.timed_steps,
        "rounds": args.rounds,
        "distill": {
            "corpus": "Milton (public)",
            "lr": args.distill_lr,
            "kd_weight": args.kd_weight,
            "logit_kd_weight": args.logit_kd_weight,
            "middle_lora_r": args.middle_lora_r,
            "warmup": "10% of steps, then cosine",
            "align_budgets": _numbers(args.align_budgets, int),
            "align": {"lm_weight": 0.0, "kd_weight": args.kd_weight, "logit_kd_weight": args.align_logit_kd_weight},
        },
        "train_steps": args.train_steps,
        "lr": args.lr,
        "lora_lr": args.lora_lr,
        "lora_r": args.lora_r,
        "eval_blocks": args.eval_blocks,
        "memory": "VmHWM (peak RSS) of one process per configuration, median over rounds",
    }


def report_cost(args: argparse.Namespace, cost: dict, limits: dict) -> None:
    base = cost["full"]
    print_table(
        f"SmolLM2-135M training cost, batch {args.batch_size}x{args.block_size}, fp32, "
        f"{torch.get_num_threads()} threads (median of {args.rounds}x{args.timed_steps} steps; VmHWM per process)",
        ["configuration", "tokens/s", "x full", "peak RSS MB", "x less", "x less over runtime", "trainable"],
        [
            [
                label,
                c["tokens_per_s"],
                c["tokens_per_s"] / base["tokens_per_s"],
                c["peak_rss_mb"],
                base["peak_rss_mb"] / c["peak_rss_mb"],
                (base["peak_rss_mb"] - base["rss_runtime_mb"]) / (c["peak_rss_mb"] - c["rss_runtime_mb"]),
                c["trainable_params"],
            ]
            for label, c in (
                ("(a) full fine-tuning", cost["full"]),
                ("(a') full FT, chunked head", cost["full_lean"]),
                ("(b) 2-8-2 emulator, 4 blocks", cost["adapter"]),
                (f"(c) 2-8-2 emulator + LoRA r{args.lora_r}", cost["lora"]),
                ("(d) (c), adapter blocks checkpointed", cost["lora_ckpt"]),
            )
        ],
    )
    print(f"analytic FLOP limit: {limits['flop_ratio_adapter']:.2f}x (b), {limits['flop_ratio_lora']:.2f}x (c)")


def report_quality(
    args: argparse.Namespace, refs: dict, curve: list, variants: list, sweep: list, selection: dict | None
) -> None:
    columns = ["emulator", "emulator/full (public)", "emu+LoRA", "plug-in LoRA", "recovered"]

    def row(p: dict) -> list:
        lora = p["lora"]
        return [
            p["emulator"],
            p["public"]["ratio"],
            lora["emulator_adapter"],
            lora["plugin"],
            p["plugin_gain_recovered_lora"],
        ]

    print_table(
        f"perplexity on held-out Shakespeare ({args.eval_blocks}x{args.block_size} tokens), {args.train_steps} "
        f"training steps: zero-shot {refs['zero_shot']:.2f}, full FT {refs['full_ft']:.2f}, "
        f"LoRA on the full model {refs['ceiling_lora']:.2f}",
        ["distill steps", "stage", "seconds", *columns],
        [[p["distill_steps"], p.get("stage", ""), p["distill_seconds"], *row(p)] for p in curve],
    )
    if variants:
        print_table(
            "distillation variants",
            ["variant", "steps", *columns],
            [[v["variant"], v["distill_steps"], *row(v)] for v in variants],
        )
    if sweep:
        print_table(
            "LoRA recipe at the largest budget",
            [
                "lr",
                "rank",
                "emu+LoRA",
                "plug-in (validation)",
                "plug-in",
                "recovered",
                "on full model",
                "plug-in / ceiling",
            ],
            [
                [
                    s["recipe"]["lr"],
                    s["recipe"]["lora_r"],
                    s["emulator_adapter"],
                    s["plugin_validation"],
                    s["plugin"],
                    s["plugin_gain_recovered"],
                    s["ceiling"],
                    s["plugin_over_ceiling"],
                ]
                for s in sweep
            ],
        )
    if selection:
        recipe = selection["recipe"]
        print(
            f"chosen on the validation blocks: LoRA r{recipe['lora_r']} lr {recipe['lr']:g}, "
            f"plug-in {selection['plugin']:.2f} on the test blocks, "
            f"{selection['plugin_gain_recovered']:.3f} of full fine-tuning's gain"
        )


if __name__ == "__main__":
    main()
