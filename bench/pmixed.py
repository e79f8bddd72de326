"""PMixED: decoding speed of the shared-middle batched ensemble vs separate member forwards, and quality.

Speed (SmolLM2-135M, 2-8-2 LoRA adapters, i.e. LoRA on blocks 0-1 and 28-29 of the full model):
for ensemble sizes N = 4, 8, 16 with q = 3/N (three members sampled per token on average), cache
the prompt for p0 and every member (timed as "prefill"; the service does this before a Generate
longer than 1/q tokens), then decode a Shakespeare continuation token by token with
  (a) single: one non-private model (a member plugged in), HF KV cache, sampling its distribution;
  (b) batched: ``EnsembleSession`` -- p0 and the sampled members packed into one pass, every block
      once (LoRA adapter blocks too, with each row's low-rank update), per-row KV caches filled lazily;
  (c) separate: p0 and each sampled member as its own full forward (LoRA merged into its adapter
      blocks) with its own HF KV cache (the original's way of running members, given the same
      caching so only the batching differs).
(b) and (c) see the same subsets S and the same token stream (teacher-forced, so both do the same
work), and both include the Rényi projection, the mixture and the sampling. Speed does not depend
on what the adapters learned, so these members are random LoRA perturbations.

Quality (Shakespeare, 4 owners holding disjoint plays; held-out = the last 10% of every work):
perplexity of the public model (SmolLM2 as shipped), a non-private fine-tuned model (LoRA 2-8-2 on
all owners' text), DP-SGD at the same epsilon (Opacus, same adapter), and PMixED over the 4 owners'
adapters. PMixED perplexity is the evaluator's view: at every held-out position a fresh Poisson S
is drawn and the mixture's probability of the true next token is scored (nothing is released).
Training is short (CPU budget), so absolute gains over the public model are small; see the JSON.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import math
import statistics
import time

import numpy as np
import torch
from transformers import DynamicCache

from bench.harness import peak_rss_mb, print_table, write_results
from bench.heldout import heldout_blocks, mixture_nll, owner_splits
from privtune.common.corpus import shakespeare_works
from privtune.common.dpsgd import DpSgdConfig, train_round
from privtune.common.families import get_blocks
from privtune.common.models import load_model
from privtune.common.offsite import (
    OffsiteConfig,
    TrainConfig,
    adapter_manifest,
    adapter_state,
    plug_in,
    prepare_adapter,
    train_adapter,
)
from privtune.common.offsite.evaluate import perplexity
from privtune.common.offsite.synthetic import perturbed_adapter
from privtune.common.packing import holdout_split, pack
from privtune.common.pmixed import PMixedBudget, mixture_distribution, poisson_subsample, sample_token
from privtune.common.pmixed.ensemble import PUBLIC, Ensemble, MemberAdapter, unique_bytes

MODEL = "smollm2"
SPLIT = OffsiteConfig(k_bottom=2, k_top=2, n_emulator=8, adapter="lora", lora_r=8, lora_alpha=16)
SIZES = (4, 8, 16)
SAMPLED = 3.0
EPSILON, DELTA, ALPHA = 8.0, 1e-5, 3


# ----------------------------------------------------------------------------------------- speed
def random_member(base: torch.nn.Module, seed: int) -> MemberAdapter:
    model = perturbed_adapter(base, SPLIT, seed, scale=0.02)
    return MemberAdapter(f"random-{seed}", adapter_state(model), adapter_manifest(model))


def separate_model(base: torch.nn.Module, member: MemberAdapter) -> torch.nn.Module:
    """A member as its own full model: the base's weights (no copies) with the member's adapter blocks
    merged into block copies (``plug_in``), run by its own forward."""
    plugged_blocks = get_blocks(plug_in(base, member.state, member.manifest))
    memo = {id(t): t for t in itertools.chain(base.parameters(), base.buffers())}
    model = copy.deepcopy(base, memo)
    blocks = get_blocks(model)
    for index in set(member.manifest.indices):
        blocks[index] = plugged_blocks[index].eval()
    return model


def release(probs: torch.Tensor, budget: PMixedBudget, rng: np.random.Generator) -> int:
    dist = mixture_distribution(probs[1:] if len(probs) > 1 else None, probs[0], budget.alpha, budget.beta())
    return sample_token(dist, rng)


class Batched:
    """(b): one ``EnsembleSession``; p0 and S packed into one pass."""

    def __init__(self, ensemble: Ensemble, tokens: list[int], prompt: int) -> None:
        self.session = ensemble.session(tokens[:prompt])
        self.tokens, self.prompt = tokens, prompt

    def prefill(self, members: range) -> None:
        self.session.prefill(members)

    def probs(self, k: int, chosen: list[int]) -> torch.Tensor:
        if k:
            self.session.extend([self.tokens[self.prompt + k - 1]])
        return self.session.probs(chosen)


class Separate:
    """(c): p0 and every sampled member as its own full forward, each with its own HF KV cache."""

    def __init__(self, models: dict[int, torch.nn.Module], tokens: list[int], prompt: int) -> None:
        self.models, self.tokens, self.prompt = models, tokens, prompt
        self.caches: dict[int, DynamicCache] = {}
        self.seen: dict[int, int] = {}

    def _logits(self, row: int, n: int) -> torch.Tensor:
        ids = torch.tensor([self.tokens[self.seen.get(row, 0) : n]])
        cache = self.caches.setdefault(row, DynamicCache())
        self.seen[row] = n
        return self.models[row](ids, past_key_values=cache, use_cache=True).logits[0, -1]

    def prefill(self, members: range) -> None:
        for row in [PUBLIC, *members]:
            self._logits(row, self.prompt - 1)

    def probs(self, k: int, chosen: list[int]) -> torch.Tensor:
        n = self.prompt + k
        return torch.stack([torch.softmax(self._logits(row, n).to(torch.float64), dim=-1) for row in [PUBLIC, *chosen]])


class Single:
    """(a): one non-private model decoding with its KV cache and sampling its own distribution."""

    def __init__(self, model: torch.nn.Module, tokens: list[int], prompt: int) -> None:
        self.model, self.tokens, self.prompt = model, tokens, prompt
        self.cache, self.seen = DynamicCache(), 0

    def prefill(self, members: range) -> None:
        self.model(torch.tensor([self.tokens[: self.prompt - 1]]), past_key_values=self.cache, use_cache=True)
        self.seen = self.prompt - 1

    def probs(self, k: int, chosen: list[int]) -> torch.Tensor:
        n = self.prompt + k
        logits = self.model(
            torch.tensor([self.tokens[self.seen : n]]), past_key_values=self.cache, use_cache=True
        ).logits
        self.seen = n
        return torch.softmax(logits[0, -1].to(torch.float64), dim=-1).unsqueeze(0)


@torch.no_grad()
def timed_steps(
    decoders: dict[str, object], subsets: list[list[int]], budget: PMixedBudget, size: int
) -> tuple[dict, dict, dict]:
    """Prefill seconds, then per-token seconds of each decoder, interleaved step by step so that load
    on a shared machine hits every decoder alike."""
    prefill = {}
    for name, decoder in decoders.items():
        start = time.perf_counter()
        decoder.prefill(range(size))
        prefill[name] = time.perf_counter() - start
    times = {name: [] for name in decoders}
    mixing = []
    last = {}
    rng = np.random.default_rng(0)
    for k, chosen in enumerate(subsets):
        for name, decoder in decoders.items():
            start = time.perf_counter()
            probs = decoder.probs(k, chosen)
            mixed = time.perf_counter()
            if name == "single":
                sample_token(probs[0], rng)
            else:
                release(probs, budget, rng)
            times[name].append(time.perf_counter() - start)
            if name == "batched":
                mixing.append(time.perf_counter() - mixed)
            last[name] = probs
    times["mixing"] = mixing
    return prefill, times, last


def speed(loaded, prompt: int, steps: int) -> dict:
    base = loaded.model
    members = [random_member(base, seed) for seed in range(max(SIZES))]
    ensemble = Ensemble(base, members)
    text = holdout_split(shakespeare_works(), 0.1).heldout[0].text
    tokens = loaded.tokenizer.encode(text)[: prompt + steps]
    rows, per_size, single = [], {}, []
    for size in SIZES:
        q = SAMPLED / size
        budget = PMixedBudget(EPSILON, DELTA, ALPHA, T=1024, q=q, n_members=size)
        rng = np.random.default_rng(size)
        subsets = [poisson_subsample(size, q, rng).tolist() for _ in range(steps)]
        models = {PUBLIC: base, **{row: separate_model(base, members[row]) for row in range(size)}}
        decoders = {
            "batched": Batched(ensemble, tokens, prompt),
            "separate": Separate(models, tokens, prompt),
            "single": Single(models[0], tokens, prompt),
        }
        prefill, times, last = timed_steps(decoders, subsets, budget, size)
        agreement = float((last["batched"] - last["separate"]).abs().max())
        if agreement > 1e-4:
            raise AssertionError(f"batched and separate forwards disagree by {agreement} at N={size}")
        single += times["single"]
        figures = {
            "q": q,
            "mean_sampled": statistics.mean(len(s) for s in subsets),
            "batched_ms_per_token": 1e3 * statistics.median(times["batched"]),
            "separate_ms_per_token": 1e3 * statistics.median(times["separate"]),
            "single_ms_per_token": 1e3 * statistics.median(times["single"]),
            "mixing_ms_per_token": 1e3 * statistics.median(times["mixing"]),
            "batched_tokens_per_s": steps / sum(times["batched"]),
            "separate_tokens_per_s": steps / sum(times["separate"]),
            "single_tokens_per_s": steps / sum(times["single"]),
            "speedup": sum(times["separate"]) / sum(times["batched"]),
            "prefill_s": prefill,
            "prefill_speedup": prefill["separate"] / prefill["batched"],
            "end_to_end_speedup": (prefill["separate"] + sum(times["separate"]))
            / (prefill["batched"] + sum(times["batched"])),
            "median_step_speedup": statistics.median(s / b for s, b in zip(times["separate"], times["batched"])),
            "max_prob_difference": agreement,
        }
        per_size[str(size)] = figures
        rows.append(
            [
                size,
                q,
                figures["mean_sampled"],
                figures["single_ms_per_token"],
                figures["batched_ms_per_token"],
                figures["mixing_ms_per_token"],
                figures["separate_ms_per_token"],
                figures["speedup"],
                figures["median_step_speedup"],
                figures["prefill_speedup"],
            ]
        )
    print_table(
        f"PMixED decoding, {MODEL} 2-8-2 LoRA members, prompt {prompt} tokens, {steps} new tokens "
        "after the prompt is cached for every member (median ms per token; 'of which mixing' = projection, "
        "mixture and sampling inside batched and separate alike; separate/batched = ratio of total decode "
        "times; per step = median of per-step ratios; prefill = ratio of prompt-caching times)",
        [
            "N",
            "q",
            "mean |S|",
            "single",
            "batched",
            "of which mixing",
            "separate",
            "separate/batched",
            "per step",
            "prefill",
        ],
        rows,
    )
    # What the members cost on top of the base model, for the largest ensemble (the last `models`).
    held_mb = {
        "batched": ensemble.extra_bytes() / 2**20,
        "separate": unique_bytes((p for m in models.values() for p in m.parameters()), base.parameters()) / 2**20,
    }
    print_table(
        f"memory held for {len(members)} members on top of the base model (MB)",
        ["batched", "separate", "ratio"],
        [[held_mb["batched"], held_mb["separate"], held_mb["separate"] / held_mb["batched"]]],
    )
    return {
        "single_ms_per_token": 1e3 * statistics.median(single),
        "single_tokens_per_s": len(single) / sum(single),
        "by_size": per_size,
        "members_memory_mb": {**held_mb, "ensemble_size": len(members)},
    }


# --------------------------------------------------------------------------------------- quality
def train_lora(base, blocks, steps, batch_size, lr, seed) -> tuple[dict, object]:
    model = prepare_adapter(copy.deepcopy(base), SPLIT, seed=seed)
    train_adapter(model, blocks, TrainConfig(steps=steps, batch_size=batch_size, lr=lr, seed=seed), progress=False)
    return adapter_state(model), adapter_manifest(model)


def train_dpsgd(base, blocks, steps, batch_size, lr, seed) -> tuple[dict, object, float, float]:
    model = prepare_adapter(copy.deepcopy(base), SPLIT, seed=seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    result = train_round(
        model,
        optimizer,
        blocks,
        sample_rate=batch_size / len(blocks),  # the bench's own data: its size is public here
        batch_size=batch_size,
        steps=steps,
        seed=seed,
        config=DpSgdConfig(max_grad_norm=1.0, delta=DELTA, target_epsilon=EPSILON, total_steps=steps),
    )
    return adapter_state(model), adapter_manifest(model), result.epsilon, result.plan.noise_multiplier


@torch.no_grad()
def pmixed_perplexity(base, plugged, heldout, qs, queries) -> dict[str, float]:
    """Mean over held-out positions of -log mixture(true token), a fresh Poisson S per position."""
    nll = {q: 0.0 for q in qs}
    count = 0
    budgets = {q: PMixedBudget(EPSILON, DELTA, ALPHA, T=queries, q=q, n_members=len(plugged)) for q in qs}
    rngs = {q: np.random.default_rng(1) for q in qs}
    for block in heldout:
        ids = block.unsqueeze(0)
        probs = torch.stack([torch.softmax(m(ids).logits[0, :-1].to(torch.float64), dim=-1) for m in [base, *plugged]])
        for q, total in mixture_nll(probs, block[1:], budgets, rngs).items():
            nll[q] += total
        count += len(block) - 1
    return {str(q): math.exp(total / count) for q, total in nll.items()}


def quality(
    loaded,
    owners: int,
    block: int,
    member_steps: int,
    eval_blocks: int,
    dp_steps: int,
    dp_batch: int,
    qs: tuple[float, ...],
    headline_q: float,
) -> dict:
    base, tokenizer = loaded.model, loaded.tokenizer
    splits = owner_splits(owners)
    heldout = heldout_blocks(splits, tokenizer, block, eval_blocks)
    owner_blocks = [pack(s.train, tokenizer, block) for s in splits]
    union = torch.cat(owner_blocks)
    seconds = {}
    start = time.perf_counter()
    members = [train_lora(base, blocks, member_steps, 4, 2e-3, seed) for seed, blocks in enumerate(owner_blocks)]
    seconds["members"] = time.perf_counter() - start
    start = time.perf_counter()
    fine_tuned = train_lora(base, union, member_steps * owners // 2, 4, 2e-3, 100)
    seconds["fine_tuned"] = time.perf_counter() - start
    start = time.perf_counter()
    dp_state, dp_manifest, dp_epsilon, sigma = train_dpsgd(base, union, dp_steps, dp_batch, 2e-3, 200)
    seconds["dpsgd"] = time.perf_counter() - start
    plugged = [plug_in(base, state, manifest) for state, manifest in members]
    queries = heldout.numel()
    start = time.perf_counter()
    ppl = {
        "public": perplexity(base, heldout, 4),
        "fine_tuned": perplexity(plug_in(base, *fine_tuned), heldout, 4),
        "dpsgd": perplexity(plug_in(base, dp_state, dp_manifest), heldout, 4),
        "members_mean": statistics.mean(perplexity(m, heldout, 4) for m in plugged),
    }
    pmixed_by_q = pmixed_perplexity(base, plugged, heldout, qs, queries)
    seconds["evaluate"] = time.perf_counter() - start
    ppl["pmixed"] = pmixed_by_q[str(headline_q)]
    print_table(
        f"perplexity on held-out Shakespeare ({len(heldout)} blocks x {block} tokens), epsilon {EPSILON}",
        ["model", "perplexity"],
        [
            ["public (SmolLM2 as shipped)", ppl["public"]],
            ["fine-tuned, non-private", ppl["fine_tuned"]],
            [f"DP-SGD (eps {dp_epsilon:.3g}, sigma {sigma:.3g})", ppl["dpsgd"]],
            ["single member (mean over owners)", ppl["members_mean"]],
            *[[f"PMixED q={q} (N={owners}, T={queries})", pmixed_by_q[str(q)]] for q in qs],
        ],
    )
    return {
        "ppl": ppl,
        "pmixed_ppl_by_q": pmixed_by_q,
        "dpsgd_epsilon": dp_epsilon,
        "dpsgd_noise_multiplier": sigma,
        "pmixed_beta_by_q": {str(q): PMixedBudget(EPSILON, DELTA, ALPHA, queries, q, owners).beta() for q in qs},
        "train_seconds": seconds,
        "settings": {
            "owners": owners,
            "block_size": block,
            "member_steps": member_steps,
            "member_batch": 4,
            "fine_tuned_steps": member_steps * owners // 2,
            "dpsgd_steps": dp_steps,
            "dpsgd_expected_batch": dp_batch,
            "lr": 2e-3,
            "eval_blocks": len(heldout),
            "pmixed_queries_T": queries,
            "headline_q": headline_q,
            "alpha": ALPHA,
            "delta": DELTA,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--steps", type=int, default=32, help="new tokens decoded per mode and size")
    parser.add_argument("--owners", type=int, default=4)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--member-steps", type=int, default=6)
    parser.add_argument("--dp-steps", type=int, default=12)
    parser.add_argument("--dp-batch", type=int, default=8)
    parser.add_argument("--eval-blocks", type=int, default=6)
    args = parser.parse_args()
    torch.manual_seed(0)
    loaded = load_model(MODEL)
    start = time.perf_counter()
    speed_figures = speed(loaded, args.prompt, args.steps)
    speed_seconds = time.perf_counter() - start
    quality_figures = quality(
        loaded,
        args.owners,
        args.block,
        args.member_steps,
        args.eval_blocks,
        args.dp_steps,
        args.dp_batch,
        qs=(0.03, 0.1, 0.25),
        headline_q=0.1,
    )
    largest = speed_figures["by_size"][str(max(SIZES))]
    write_results(
        "pmixed",
        {
            "model": MODEL,
            "split": "2-8-2 LoRA r=8 (adapter blocks 0,1,28,29 of the full model)",
            "epsilon": EPSILON,
            "delta": DELTA,
            "alpha": ALPHA,
            "speedup_batched_vs_separate": {size: fig["speedup"] for size, fig in speed_figures["by_size"].items()},
            "tokens_per_s": {
                "single": speed_figures["single_tokens_per_s"],
                "batched": largest["batched_tokens_per_s"],
                "separate": largest["separate_tokens_per_s"],
                "ensemble_size": max(SIZES),
            },
            "ms_per_token": {
                "single": speed_figures["single_ms_per_token"],
                "batched": largest["batched_ms_per_token"],
                "separate": largest["separate_ms_per_token"],
            },
            "speed": {
                **speed_figures,
                "prompt_tokens": args.prompt,
                "new_tokens": args.steps,
                "speed_seconds": speed_seconds,
            },
            **quality_figures,
            "peak_rss_mb": peak_rss_mb(),
        },
    )


if __name__ == "__main__":
    main()
