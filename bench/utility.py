"""Utility of the private paths: held-out perplexity against epsilon for DP-SGD and PMixED (SmolLM2-135M).

The same held-out Shakespeare as ``bench.pmixed``'s quality part (4 owners holding disjoint works,
the last 10% of every work held out, a fixed random choice of 64-token blocks). Every method trains
the same adapter, LoRA of rank ``lora_r`` on every linear layer of the top ``k_top`` blocks (all but
the first), with AdamW for ``steps`` steps of ``batch`` records:

- public: SmolLM2 as shipped.
- fine_tuned: non-private, on all owners' training records (a fixed batch drawn at random per step,
  no clipping, no noise).
- dpsgd: record-level DP-SGD (``privtune.common.dpsgd.train_round``) at epsilon 1, 3, 8, delta 1e-5.
  A record is a blank-line separated paragraph (a speech, in the plays) of an owner's training
  text, as ``client/data.py``'s ``dp-records paragraphs`` builds it, its first ``record_tokens``
  tokens trained on; a whole work gets only group privacy over its paragraphs. Records are Poisson
  sampled at rate batch / records and epsilon comes from Opacus' RDP accountant for that rate.
- pmixed: PMixED over owners x m members, member i of an owner trained from the public model on the
  i-th of its m shards alone (``client/data.py``'s ``member_shards``: whole works dealt round
  robin), non-privately, the members sharing one run's records (``steps * batch / members`` each,
  at the step count and learning rate the public member sweep chose for that m); the guarantee
  is PMixED's: (epsilon, 1e-5)-DP per member shard (a set of whole works) over T = 1024 queries,
  from ``common/pmixed/accountant.py`` for the exact (alpha, q, N) scored.
  Perplexity is the evaluator's view: a fresh Poisson S at every held-out position and the
  mixture's probability of the true token (``bench.heldout.mixture_nll``).

``gap_recovered[method][eps] = (public - method) / (public - fine_tuned)``.

DP-SGD's learning rate comes from a sweep on PUBLIC data only (Milton's works, split into paragraph
records with their own held-out tail, DP-SGD with the same batch, steps, adapter and clipping and
the noise multiplier of the owners' epsilon-8 plan), then is applied unchanged to the owners'
records: the choice depends on no private record, so it costs no privacy. The clipping norm is not
swept: it lies far below every per-record gradient norm, so every record is clipped to it, and
under Adam a common scale of all gradients and of the noise does not change the step.

PMixED's members train at their own batch (a few records), where DP-SGD's learning rate is not
the right one, so their recipe (learning rate, and steps x f at batch / f: the same records in
more, smaller steps) comes from a second sweep on the same public data: members trained on
shards of Milton's paragraph records at the member batch, scored on Milton's held-out tail; the
recipe of lowest mean member perplexity is applied unchanged to the owners' members. PMixED's
(m, q, alpha) grid is scored on the held-out Shakespeare itself and every point is reported; the
headline per epsilon is the best point, a selection among the grid's points on the evaluation text
(stated in the JSON).

Compute (2 shared CPU cores) is the constraint: a training token costs a forward and a backward
through 29 blocks and the 49k-word head, so records are capped at ``record_tokens`` tokens and the
runs are short; held-out scoring runs the frozen first block once and only the adapted blocks and
the head per model (``TopScorer``).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bench.harness import RESULTS_DIR, peak_rss_mb, print_table, write_results
from bench.heldout import heldout_blocks, mixture_nll, owner_splits
from privtune.client.data import encode_records, member_shards
from privtune.common.corpus import Document, public_corpus
from privtune.common.dpsgd import (
    PAD,
    DpSgdConfig,
    lm_per_sample_loss,
    noise_multiplier_for,
    record_unit,
    train_round,
)
from privtune.common.errors import PrivtuneError
from privtune.common.families import get_blocks, num_blocks, stem_of
from privtune.common.models import load_model
from privtune.common.offsite import OffsiteConfig, adapter_manifest, adapter_state, plug_in, prepare_adapter
from privtune.common.packing import holdout_split, pack
from privtune.common.pmixed import Box, PMixedBudget, best_budget, project_box

MODEL = "smollm2"
NAME = "utility"
DELTA = 1e-5
EPSILONS = (1.0, 3.0, 8.0)
QUERIES = 1024
PROJECTION_TOL = 1e-3
"""The projection's bisection bracket when scoring (the service uses 1e-7): same guarantee, 10 steps instead of 24."""
RECORDS = "paragraphs"
PHYSICAL_BATCH = 64
"""Per-record gradients are computed 64 records at a time (Opacus' accumulation: the same step, less memory)."""


@dataclass(frozen=True)
class Settings:
    owners: int = 4
    block: int = 64
    eval_blocks: int = 8
    """8 blocks of 64 tokens: 504 scored positions, within PMixED's budget of T = 1024 queries."""
    sweep_eval_blocks: int = 8
    record_tokens: int = 16
    batch: int = 128
    """Records per step: DP-SGD's expected (Poisson) batch, fine-tuned's fixed batch, split among PMixED's members."""
    steps: int = 6
    k_top: int = 29
    """All blocks but the first: the split needs one block outside the adapter."""
    lora_r: int = 8
    clip: float = 0.1
    """Far below the per-record gradient norms (the smallest of 48 public records' at the start is 1.6): every
    record is clipped, and under Adam the norm then only scales gradients and noise alike."""
    sweep_lrs: tuple[float, ...] = (1e-3, 3e-3)
    """DP-SGD's learning rates tried on public data."""
    member_lrs: tuple[float, ...] = (3e-4, 1e-3, 2e-3, 3e-3)
    """PMixED members' learning rates tried on public data (3e-3 is what the DP-SGD sweep picks at batch 128)."""
    member_step_factors: tuple[int, ...] = (1, 2)
    """Member schedules tried on public data: ``steps * f`` steps at batch ``member_batch // f`` (same records)."""
    sweep_members: int = 2
    """Public members trained per recipe in the member sweep (on as many of Milton's shards); their mean is scored."""
    shards: tuple[int, ...] = (2, 4, 8, 10)
    qs: tuple[float, ...] = (0.04, 0.08, 0.12, 0.16, 0.25)
    alpha_candidates: tuple[int, ...] = (3, 4, 5, 6, 8, 10, 12, 16, 20, 32)
    alphas_kept: int = 1
    """Per (epsilon, q, N), the Rényi orders scored: those of largest ball radius alpha * beta (data-independent)."""
    box_qs: tuple[float, ...] = (1.0,)
    """The box allows q = 1 (every member, every query); below 1 its mixing weight (1-(1-q)^N)/N barely falls once
    qN is a few, while the mixture only gets noisier, so q = 1 alone is scored."""
    box_splits: tuple[float, ...] = (0.5, 0.7, 0.85, 0.95)
    """Shares b / (a + b) of the box's width above p0 tried on public data; per (m, epsilon, q) the best is scored."""

    def split(self) -> OffsiteConfig:
        """The adapter on the full (unthinned) model; n_emulator only matters for a thinned one."""
        return OffsiteConfig(
            k_bottom=0, k_top=self.k_top, n_emulator=1, adapter="lora", lora_r=self.lora_r, lora_alpha=2 * self.lora_r
        )

    def member_batch(self, members: int) -> int:
        """Each PMixED member's batch: the members together process as many records as one fine-tuning run."""
        return max(1, self.batch // members)

    def member_schedules(self, members: int) -> list[tuple[int, int]]:
        """(steps, batch) a member may train with: ``member_batch``'s records, in ``f`` times more steps of 1/f."""
        batch = self.member_batch(members)
        return [(self.steps * f, batch // f) for f in self.member_step_factors if batch % f == 0]


QUICK = Settings(
    owners=4,
    eval_blocks=2,
    sweep_eval_blocks=2,
    record_tokens=8,
    batch=4,
    steps=2,
    k_top=2,
    lora_r=2,
    sweep_lrs=(3e-3,),
    member_lrs=(1e-3, 3e-3),
    shards=(1, 2),
    qs=(0.04,),
    alphas_kept=1,
)


def gap_recovered(public: float, fine_tuned: float, ppl: float) -> float:
    """Share of the non-private fine-tuning gain that a method keeps: 1 = as fine-tuned, 0 = as public."""
    return (public - ppl) / (public - fine_tuned)


def paragraph_records(documents: list[Document], tokenizer, max_tokens: int) -> torch.Tensor:
    """One row per paragraph record (plain text: every real token is a target), as the owners' client builds them."""
    return encode_records(documents, RECORDS, tokenizer, max_tokens).ids


def record_tokens(rows: torch.Tensor) -> float:
    """Mean trained tokens per record."""
    return float((rows != PAD).sum()) / len(rows)


# ----------------------------------------------------------------------------------------- scoring
class TopScorer:
    """Next-token distributions of models that differ from ``base`` only in blocks >= ``first``.

    The hidden state entering block ``first`` is the same for all of them, so it is computed once
    per held-out block; each model then runs only its own top blocks, the final norm and the head.
    """

    def __init__(self, base: nn.Module, blocks: torch.Tensor, first: int) -> None:
        self.base, self.first, self.blocks = base, first, blocks
        self.stem = stem_of(base)
        with torch.no_grad():
            out = base(blocks, output_hidden_states=True)
        self.hidden = out.hidden_states[first]

    def logits(self, top: list[nn.Module], rows: slice = slice(None)) -> torch.Tensor:
        hidden = self.hidden[rows]
        positions = torch.arange(hidden.shape[1]).expand(hidden.shape[0], -1)
        kwargs = self.stem.block_kwargs(hidden, positions)
        with torch.no_grad():
            for block in top:
                out = block(hidden, attention_mask=None, position_ids=positions, **kwargs)
                hidden = out[0] if isinstance(out, tuple) else out
            return self.stem.logits(hidden, self.base.get_output_embeddings())

    def perplexity(self, top: list[nn.Module]) -> float:
        logits = self.logits(top)[:, :-1].float()
        targets = self.blocks[:, 1:]
        nll = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        return math.exp(float(nll))

    def probs(self, top: list[nn.Module], row: int) -> torch.Tensor:
        """(L-1, V) float64 next-token distributions at the positions of held-out block ``row``."""
        return torch.softmax(self.logits(top, slice(row, row + 1))[0, :-1].to(torch.float64), dim=-1)

    def next_logits(self, top: list[nn.Module]) -> torch.Tensor:
        """(blocks, L-1, V) logits at every held-out position, as computed (float32): ``probs`` of any row is
        their float64 softmax, so keeping these for many models costs half the memory and loses nothing."""
        return torch.cat([self.logits(top, slice(row, row + 1))[:, :-1] for row in range(len(self.blocks))])


def top_blocks(base: nn.Module, model: nn.Module, first: int) -> list[nn.Module]:
    """The adapted model's blocks from ``first`` on, LoRA merged (``plug_in``), detached from the full copy."""
    plugged = plug_in(base, adapter_state(model), adapter_manifest(model))
    return [block.eval() for block in list(get_blocks(plugged))[first:]]


def public_top(base: nn.Module, first: int) -> list[nn.Module]:
    return list(get_blocks(base))[first:]


# ---------------------------------------------------------------------------------------- training
@dataclass
class Run:
    """What one training run cost and, for DP-SGD, what it guarantees."""

    steps: int
    batch: int
    records_processed: float
    tokens_processed: float
    seconds: float
    lr: float
    max_grad_norm: float | None = None
    epsilon: float | None = None
    noise_multiplier: float | None = None
    sample_rate: float | None = None
    records: int | None = None


@dataclass(frozen=True)
class MemberRecipe:
    """How each PMixED member trains (non-privately, from the public model, on its shard alone)."""

    lr: float
    steps: int
    batch: int


def fresh_adapter(base: nn.Module, settings: Settings, seed: int) -> nn.Module:
    return prepare_adapter(copy.deepcopy(base), settings.split(), seed=seed)


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def train_nonprivate(model: nn.Module, rows: torch.Tensor, steps: int, batch: int, lr: float, seed: int) -> Run:
    """AdamW on the per-record loss DP-SGD uses, ``batch`` records drawn at random each step."""
    optimizer = torch.optim.AdamW(trainable(model), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    start, tokens = time.perf_counter(), 0
    model.train()
    for _ in range(steps):
        picked = rows[torch.randperm(len(rows), generator=generator)[:batch]]
        picked = picked[:, : int((picked != PAD).sum(dim=1).max())]
        optimizer.zero_grad(set_to_none=True)
        lm_per_sample_loss(model, picked).mean().backward()
        optimizer.step()
        tokens += int((picked != PAD).sum())
    model.eval()
    return Run(steps, batch, steps * min(batch, len(rows)), tokens, time.perf_counter() - start, lr)


def owners_config(settings: Settings, epsilon: float) -> DpSgdConfig:
    """The owners' DP-SGD plan: ``settings.steps`` steps reaching ``epsilon`` per record (delta 1e-5)."""
    return DpSgdConfig(max_grad_norm=settings.clip, delta=DELTA, target_epsilon=epsilon, total_steps=settings.steps)


def train_private(
    model: nn.Module, rows: torch.Tensor, settings: Settings, config: DpSgdConfig, lr: float, seed: int
) -> Run:
    """Record-level DP-SGD for ``settings.steps`` steps at expected batch ``settings.batch`` under ``config``."""
    optimizer = torch.optim.AdamW(trainable(model), lr=lr)
    start = time.perf_counter()
    result = train_round(
        model,
        optimizer,
        rows,
        sample_rate=settings.batch / len(rows),  # the bench's own data: its size is public here
        batch_size=settings.batch,
        steps=settings.steps,
        config=config,
        seed=seed,
        unit=record_unit(RECORDS, settings.record_tokens),
        max_physical_batch=PHYSICAL_BATCH,
    )
    model.eval()
    expected = settings.batch * settings.steps
    return Run(
        settings.steps,
        settings.batch,
        expected,
        expected * record_tokens(rows),
        time.perf_counter() - start,
        lr,
        config.max_grad_norm,
        result.epsilon,
        result.plan.noise_multiplier,
        result.plan.sample_rate,
        len(rows),
    )


# ----------------------------------------------------------------------------------------- stages
@dataclass
class PublicTask:
    """The public data the hyperparameter sweeps see: Milton's paragraph records and a scorer of its held-out tail.

    Nothing in it comes from an owner, so a choice made on it costs no privacy.
    """

    rows: torch.Tensor
    scorer: TopScorer
    public_ppl: float

    def describe(self) -> str:
        return f"public corpus (Milton): {len(self.rows)} paragraph records, {len(self.scorer.blocks)} held-out blocks"


def public_task(base: nn.Module, tokenizer, settings: Settings, first: int) -> PublicTask:
    split = holdout_split(public_corpus(), 0.1)
    rows = paragraph_records(split.train, tokenizer, settings.record_tokens)
    heldout = pack(split.heldout, tokenizer, settings.block)
    heldout = heldout[
        torch.randperm(len(heldout), generator=torch.Generator().manual_seed(0))[: settings.sweep_eval_blocks]
    ]
    scorer = TopScorer(base, heldout, first)
    return PublicTask(rows, scorer, scorer.perplexity(public_top(base, first)))


Trainer = Callable[[dict[str, Any], int], Iterator[tuple[nn.Module, Run]]]
"""Trains the models of one sweep candidate (with the given seed), yielding each as soon as it is trained."""


def sweep(
    base: nn.Module, first: int, task: PublicTask, candidates: list[dict[str, Any]], train: Trainer, seed: int
) -> dict[str, Any]:
    """Each candidate's models, trained by ``train`` and scored on the public held-out tail; the lowest mean wins.

    Models are scored and dropped one at a time: each is a full copy of the model.
    """
    points: list[dict[str, Any]] = []
    for i, candidate in enumerate(candidates):
        ppls, runs = [], []
        for model, run in train(candidate, seed + i):
            ppls.append(task.scorer.perplexity(top_blocks(base, model, first)))
            runs.append(dataclasses.asdict(run))
            del model
        points.append({**candidate, "ppl": float(np.mean(ppls)), "ppls": ppls, "runs": runs})
        seconds = sum(r["seconds"] for r in runs)
        print(f"  sweep {candidate}: public held-out ppl {points[-1]['ppl']:.2f} ({seconds:.0f} s)")
    best = min(points, key=lambda p: p["ppl"])
    return {
        "data": task.describe(),
        "public_ppl": task.public_ppl,
        "points": points,
        "chosen": {key: best[key] for key in candidates[0]},
    }


def sweep_dpsgd(
    base: nn.Module, task: PublicTask, settings: Settings, first: int, noise_multiplier: float
) -> dict[str, Any]:
    """DP-SGD on Milton's paragraph records at each learning rate, scored on Milton's held-out tail.

    Same adapter, batch, steps and clipping as the owners' runs, and the noise multiplier of their
    epsilon-8 plan: Milton has far fewer records, so planning epsilon 8 on them would add more noise
    than the owners' runs see.
    """
    config = DpSgdConfig(max_grad_norm=settings.clip, delta=DELTA, noise_multiplier=noise_multiplier)

    def train(candidate: dict[str, Any], seed: int) -> Iterator[tuple[nn.Module, Run]]:
        model = fresh_adapter(base, settings, seed=seed)
        yield model, train_private(model, task.rows, settings, config, candidate["lr"], seed=seed)

    result = sweep(base, first, task, [{"lr": lr} for lr in settings.sweep_lrs], train, seed=300)
    return {**result, "noise_multiplier": noise_multiplier, "max_grad_norm": settings.clip}


def sweep_members(base: nn.Module, task: PublicTask, settings: Settings, first: int, m: int) -> dict[str, Any]:
    """The owners' members' recipe for m shards each, chosen on public data at the owners' member batch.

    Public member j trains from the public model on the j-th of m shards of Milton's paragraph
    records (dealt round robin: Milton has 7 works, too few to shard by work, and a member sees
    only ``steps * batch`` of its shard's records either way), at every learning rate and schedule
    of the same records (``member_schedules``); the recipe of lowest mean held-out perplexity wins.
    """
    members = settings.owners * m
    candidates = [
        {"lr": lr, "steps": steps, "batch": batch}
        for steps, batch in settings.member_schedules(members)
        for lr in settings.member_lrs
    ]

    def train(candidate: dict[str, Any], seed: int) -> Iterator[tuple[nn.Module, Run]]:
        for shard in range(min(settings.sweep_members, m)):
            model = fresh_adapter(base, settings, seed=100 * seed + shard)
            shard_rows = task.rows[shard::m]
            yield (
                model,
                train_nonprivate(model, shard_rows, candidate["steps"], candidate["batch"], candidate["lr"], seed),
            )

    result = sweep(base, first, task, candidates, train, seed=500 + 10 * m)
    return {**result, "m": m, "members": members, "shard_records": len(task.rows) // m}


def member_logits(
    base: nn.Module,
    scorer: TopScorer,
    first: int,
    owner_rows: list[tuple[list[Document], torch.Tensor]],
    examples: Callable[[list[Document]], torch.Tensor],
    settings: Settings,
    m: int,
    recipe: MemberRecipe,
) -> tuple[list[torch.Tensor], list[Run]]:
    """Train owners x m members (each on its own shard, from the public model, by ``recipe``); their held-out logits.

    The logits are kept, not the members: 29 adapted blocks per member would not fit in memory for 32 members.
    """
    logits, runs = [], []
    for owner, (documents, rows) in enumerate(owner_rows):
        for shard, shard_rows in enumerate(member_shards(rows, documents, examples, m)):
            model = fresh_adapter(base, settings, seed=1000 * m + 10 * owner + shard)
            runs.append(train_nonprivate(model, shard_rows, recipe.steps, recipe.batch, recipe.lr, seed=owner))
            logits.append(scorer.next_logits(top_blocks(base, model, first)))
            del model
    return logits, runs


def stacked_probs(public: torch.Tensor, members: list[torch.Tensor], row: int) -> torch.Tensor:
    """(1 + members, L-1, V) float64 distributions of held-out block ``row``: p0 first."""
    return torch.softmax(torch.stack([public[row], *[x[row] for x in members]]).to(torch.float64), dim=-1)


def pmixed_grid(
    scorer: TopScorer,
    public: torch.Tensor,
    logits: list[torch.Tensor],
    budgets: list[PMixedBudget],
) -> dict[str, Any]:
    """Score each budget's PMixED (its projection, q and order) on the held-out blocks; the members' own perplexity."""
    rngs = {budget: np.random.default_rng(1) for budget in budgets}
    nll = dict.fromkeys(budgets, 0.0)
    member_nll = [0.0] * len(logits)
    count = 0
    start = time.perf_counter()
    for row in range(len(scorer.blocks)):
        stacked = stacked_probs(public, logits, row)
        targets = scorer.blocks[row, 1:]
        for budget, total in mixture_nll(stacked, targets, budgets_by_key(budgets), rngs, PROJECTION_TOL).items():
            nll[budget] += total
        picked = stacked[1:, torch.arange(len(targets)), targets]
        member_nll = [a - float(torch.log(p).sum()) for a, p in zip(member_nll, picked)]
        count += len(targets)
    return {
        "points": [{**grid_point(budget), "ppl": math.exp(nll[budget] / count)} for budget in budgets],
        "members_ppl_mean": float(np.mean([math.exp(x / count) for x in member_nll])),
        "score_seconds": time.perf_counter() - start,
    }


def budgets_by_key(budgets: list[PMixedBudget]) -> dict[PMixedBudget, PMixedBudget]:
    """A budget is its own key (frozen dataclass): one rng and one total per budget."""
    return {budget: budget for budget in budgets}


def grid_point(budget: PMixedBudget) -> dict[str, Any]:
    """What a scored point used: epsilon, order, q, the projection and its solved constraint."""
    return {"epsilon": budget.epsilon, "alpha": budget.alpha, "q": budget.q, **budget.parameters()}


def runs_summary(runs: list[Run]) -> dict[str, Any]:
    return {
        "each": dataclasses.asdict(runs[0]),
        "records_processed": sum(r.records_processed for r in runs),
        "tokens_processed": sum(r.tokens_processed for r in runs),
        "seconds": sum(r.seconds for r in runs),
    }


def box_budgets(settings: Settings, n_members: int, splits: Mapping[tuple[float, float], float]) -> list[PMixedBudget]:
    """Per (epsilon, q) the box budget of ``splits[epsilon, q]`` at the order of widest box (``best_budget``)."""
    return [
        best_budget(eps, DELTA, QUERIES, q, n_members, "box", splits[eps, q])
        for eps in EPSILONS
        for q in settings.box_qs
    ]


def box_nll(probs: torch.Tensor, targets: torch.Tensor, boxes: Mapping[Any, Box]) -> dict[Any, float]:
    """Summed -log of the mean of every member projected into each box (PMixED at q = 1), over positions."""
    nll = dict.fromkeys(boxes, 0.0)
    for t in range(len(targets)):
        for key, box in boxes.items():
            dist = project_box(probs[1:, t], probs[0, t], box).mean(dim=0)
            nll[key] -= math.log(float(dist[targets[t]]))
    return nll


def choose_splits(
    base: nn.Module, task: PublicTask, settings: Settings, first: int, m: int, recipe: MemberRecipe
) -> dict[str, Any]:
    """The box's split per (epsilon, q) for owners x m members, chosen on public data (Milton) alone.

    ``sweep_members`` public members train by the owners' recipe on shards of Milton's paragraph
    records, as in the member sweep. For each epsilon and q, every split's box at the width the
    owners' budget allows (their N) is applied to the public members, and their mean scored on
    Milton's held-out tail; the split of lowest perplexity wins. No owner's record is looked at.
    """
    members = settings.owners * m
    logits = []
    for shard in range(min(settings.sweep_members, m)):
        model = fresh_adapter(base, settings, seed=700 + 10 * m + shard)
        train_nonprivate(model, task.rows[shard::m], recipe.steps, recipe.batch, recipe.lr, seed=shard)
        logits.append(task.scorer.next_logits(top_blocks(base, model, first)))
        del model
    public = task.scorer.next_logits(public_top(base, first))
    boxes = {
        (eps, q, split): best_budget(eps, DELTA, QUERIES, q, members, "box", split).box()
        for eps in EPSILONS
        for q in settings.box_qs
        for split in settings.box_splits
    }
    nll = dict.fromkeys(boxes, 0.0)
    count = 0
    for row in range(len(task.scorer.blocks)):
        targets = task.scorer.blocks[row, 1:]
        for key, total in box_nll(stacked_probs(public, logits, row), targets, boxes).items():
            nll[key] += total
        count += len(targets)
    points = [{"epsilon": e, "q": q, "split": s, "public_ppl": math.exp(nll[e, q, s] / count)} for e, q, s in boxes]
    chosen = {
        (eps, q): min((p for p in points if (p["epsilon"], p["q"]) == (eps, q)), key=lambda p: p["public_ppl"])["split"]
        for eps in EPSILONS
        for q in settings.box_qs
    }
    return {
        "m": m,
        "data": task.describe() + f", {len(logits)} public members by the owners' recipe",
        "points": points,
        "chosen": [{"epsilon": e, "q": q, "split": s} for (e, q), s in chosen.items()],
    }


def chosen_splits(choice: dict[str, Any]) -> dict[tuple[float, float], float]:
    return {(c["epsilon"], c["q"]): c["split"] for c in choice["chosen"]}


def pmixed_budgets(settings: Settings, n_members: int) -> list[PMixedBudget]:
    """The Rényi ball's points scored: per epsilon and q, the ``alphas_kept`` feasible orders of largest radius.

    An order at which the epsilon cannot be met (the budget refuses it) is left out; the choice looks
    at the accountant only, never at data.
    """
    budgets = []
    for eps in EPSILONS:
        for q in settings.qs:
            feasible = []
            for alpha in settings.alpha_candidates:
                try:
                    feasible.append(PMixedBudget(eps, DELTA, alpha, QUERIES, q, n_members))
                except PrivtuneError:
                    continue
            budgets += sorted(feasible, key=lambda b: -b.alpha * b.beta())[: settings.alphas_kept]
    return budgets


def best_pmixed(grids: list[dict[str, Any]]) -> dict[float, dict[str, Any]]:
    """Per epsilon, the grid point of lowest perplexity over every m, alpha and q measured."""
    best: dict[float, dict[str, Any]] = {}
    for grid in grids:
        for point in grid["points"]:
            eps = point["epsilon"]
            if eps not in best or point["ppl"] < best[eps]["ppl"]:
                best[eps] = {**point, "m": grid["m"], "members": grid["members"]}
    return best


# ------------------------------------------------------------------------------------------- report
def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ppl = results["ppl"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.axhline(ppl["public"], color="grey", linestyle="--", label=f"public ({ppl['public']:.1f})")
    ax.axhline(
        ppl["fine_tuned"], color="black", linestyle=":", label=f"fine-tuned, non-private ({ppl['fine_tuned']:.1f})"
    )
    for method, style in (("dpsgd", "o-"), ("pmixed", "s-")):
        if method in ppl:
            eps = sorted(float(e) for e in ppl[method])
            ax.plot(eps, [ppl[method][str(e)] for e in eps], style, label=method)
    for grid in results.get("pmixed_grids", []):
        for projection, style in (("renyi", ".:"), ("box", "x--")):
            by_eps: dict[float, float] = {}
            for point in grid["points"]:
                if point["projection"] == projection:
                    by_eps[point["epsilon"]] = min(by_eps.get(point["epsilon"], math.inf), point["ppl"])
            eps = sorted(by_eps)
            label = f"pmixed {projection} m={grid['m']} (N={grid['members']})"
            ax.plot(eps, [by_eps[e] for e in eps], style, alpha=0.6, label=label)
    ax.set_xscale("log")
    ax.set_xticks(list(EPSILONS), [f"{e:g}" for e in EPSILONS])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("epsilon (delta 1e-5)")
    ax.set_ylabel("held-out perplexity")
    ax.set_title("SmolLM2-135M, held-out Shakespeare")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def gaps(ppl: dict[str, Any]) -> dict[str, dict[str, float]]:
    return {
        method: {eps: gap_recovered(ppl["public"], ppl["fine_tuned"], value) for eps, value in ppl[method].items()}
        for method in ("dpsgd", "pmixed")
        if method in ppl
    }


def targets_reached(ppl: dict[str, Any], gap: dict[str, dict[str, float]], targets: dict[str, float]) -> dict:
    """Each method's gap at epsilon 8 against its target, beside the size of the gain the ratio divides by:
    a ratio of a fraction of a perplexity point says little, whatever its value."""
    return {
        "fine_tuning_gain_ppl": ppl["public"] - ppl["fine_tuned"],
        **{
            method: {"target": target, "reached": gap[method]["8.0"] >= target, "gap_recovered": gap[method]["8.0"]}
            for method, target in targets.items()
        },
    }


def carried_results(settings: Settings, name: str) -> dict[str, Any]:
    """The figures ``--pmixed-only`` does not measure again, from the complete results file of the same settings.

    Public, fine-tuned and DP-SGD rows, the DP-SGD and member sweeps (public data; their chosen recipes are
    reused), and each grid's Rényi ball points with the members' mean perplexity they were scored with. A grid
    measured with the box under these very settings is carried whole; an m the file has no grid for is measured
    in full.
    """
    path = RESULTS_DIR / f"{name}.json"
    if not path.exists():
        raise PrivtuneError(f"--pmixed-only carries the other rows from {path}, which does not exist: run it in full")
    old = json.loads(path.read_text())
    now = {k: v for k, v in dataclasses.asdict(settings).items() if not k.startswith("box_") and k != "shards"}
    then = {k: v for k, v in old["settings"].items() if not k.startswith("box_") and k != "shards"}
    if not old.get("complete") or json.loads(json.dumps(now)) != then:
        raise PrivtuneError(f"{path} is incomplete or has other settings; run bench.utility in full")
    ppl = {k: old["ppl"][k] for k in ("public", "fine_tuned", "dpsgd")}
    renyi = {
        grid["m"]: {
            "members_ppl_mean": grid["members_ppl_mean"],
            "points": [{**p, "projection": p.get("projection", "renyi")} for p in grid["points"] if "beta" in p],
        }
        for grid in old["pmixed_grids"]
    }
    current = json.loads(json.dumps(dataclasses.asdict(settings)))
    same_box = all(old["settings"].get(k) == v for k, v in current.items() if k != "shards")
    done = {
        grid["m"]: grid
        for grid in old["pmixed_grids"]
        if same_box and any(p.get("projection") == "box" for p in grid["points"])
    }
    return {
        "ppl": ppl,
        "runs": old["runs"],
        "sweep": old["sweep"],
        "member_sweeps": {sweep["m"]: sweep for sweep in old["member_sweeps"]},
        "renyi": renyi,
        "grids": done,
        "box_split_choices": {
            choice["m"]: choice for choice in old.get("box_split_choices", []) if choice["m"] in done
        },
        "source": {k: old.get(k) for k in ("command", "measured_at", "wall_seconds", "carried")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny settings, to check the pipeline (minutes)")
    parser.add_argument(
        "--pmixed-only",
        action="store_true",
        help="measure PMixED again (members retrained by the same seeds and recipes); carry the public, fine-tuned "
        "and DP-SGD rows, the sweeps and the Rényi ball points from the existing results file",
    )
    args = parser.parse_args()
    settings = QUICK if args.quick else Settings()
    name = f"{NAME}_quick" if args.quick else NAME
    torch.manual_seed(0)
    torch.set_num_threads(1)  # on a shared, oversubscribed 2-core machine one thread per process contends least
    began = time.perf_counter()
    carried = carried_results(settings, name) if args.pmixed_only else None
    loaded = load_model(MODEL)
    base, tokenizer = loaded.model, loaded.tokenizer
    base.eval()
    first = num_blocks(base) - settings.k_top
    results: dict[str, Any] = {
        "model": MODEL,
        "settings": dataclasses.asdict(settings),
        "adapter": f"LoRA r={settings.lora_r} on every linear layer (attention and MLP) of the top {settings.k_top} "
        "of the model's blocks",
        "delta": DELTA,
        "pmixed_queries_T": QUERIES,
        "privacy_units": {
            "dpsgd": f"one paragraph record of an owner's training text (first {settings.record_tokens} tokens); "
            "a whole work gets only group privacy over its paragraphs",
            "pmixed": "one member's whole shard (a set of whole works of one owner)",
        },
        "compute_per_method": f"{settings.steps} AdamW steps of {settings.batch} records (expected, Poisson, for "
        f"DP-SGD; fixed for fine-tuned) of at most {settings.record_tokens} tokens each; PMixED's owners x m members "
        f"share that budget of {settings.steps * settings.batch} records: each processes "
        f"{settings.steps} x (batch // members) records of its own shard, in {settings.steps} x f steps of "
        f"(batch // members) / f records, f in {list(settings.member_step_factors)} chosen by the public member "
        "sweep (more, smaller steps: the same records and tokens, more optimiser steps). The public sweeps' "
        "training is not counted in any method's budget: it touches no owner's record",
        "hyperparameters": "DP-SGD's learning rate chosen by the sweep on public data (Milton) at the owners' "
        "epsilon-8 noise multiplier, applied unchanged to the owners' records; the clipping norm is fixed far below "
        "the per-record gradient norms (the smallest of 48 public records' at the start: 1.6), so under Adam it "
        "only scales gradients and noise alike; fine-tuned uses DP-SGD's lr, steps and adapter. The PMixED "
        "members' recipe (lr, and f above), per m, chosen by a second sweep on public data only: members trained "
        "at the owners' member batch on shards of Milton's paragraph records, scored on Milton's held-out tail "
        "(lowest mean member perplexity), applied unchanged to the owners' members. The box projection's split "
        "(share of its width above p0), per (m, epsilon, q), chosen on public data too (``box_splits``: public "
        "members by the owners' recipe, their box mixture scored on Milton's held-out tail); its Rényi order is "
        "the one of widest box for the budget (accountant only). PMixED's headline per epsilon is the best "
        "(projection, m, alpha, q) point measured on the held-out text (all points reported)",
        "pmixed_projections": {
            "renyi": "each member mixed with p0 into the two-sided Rényi ball of radius alpha*beta "
            "(common/pmixed/accountant.py); q below 1, the S = empty branch floors the output",
            "box": "each member projected (KL) into the box e^-a p0 <= p <= e^b p0 (common/pmixed/box.py), "
            "width a + b from common/pmixed/box_bound.py, valid for every realised S; q = 1: the mean of all members",
        },
    }

    def stage(**figures: Any) -> None:
        results.update(figures)
        results["wall_seconds"] = time.perf_counter() - began
        results["load_average_at_end"] = os.getloadavg()[0]
        results["peak_rss_mb"] = peak_rss_mb()
        write_results(name, {**results, "complete": False})

    splits = owner_splits(settings.owners)
    heldout = heldout_blocks(splits, tokenizer, settings.block, settings.eval_blocks)
    scorer = TopScorer(base, heldout, first)

    def examples(documents: list[Document]) -> torch.Tensor:
        return paragraph_records(documents, tokenizer, settings.record_tokens)

    owner_rows = [(s.train, examples(s.train)) for s in splits]
    union = torch.cat([_pad_to(rows, settings.record_tokens) for _, rows in owner_rows])
    public_logits = scorer.next_logits(public_top(base, first))
    ppl: dict[str, Any] = {"public": scorer.perplexity(public_top(base, first))}
    print(f"public {ppl['public']:.2f}; {len(union)} owner records, {record_tokens(union):.1f} tokens each")
    task = public_task(base, tokenizer, settings, first)

    if carried is not None:
        if not math.isclose(ppl["public"], carried["ppl"]["public"], rel_tol=1e-9):
            raise PrivtuneError(
                f"public perplexity {ppl['public']} differs from the carried {carried['ppl']['public']}"
            )
        ppl, runs = carried["ppl"], carried["runs"]
        stage(
            ppl=ppl,
            runs=runs,
            sweep=carried["sweep"],
            carried={
                **carried["source"],
                "figures": ["ppl.public", "ppl.fine_tuned", "ppl.dpsgd", "runs", "sweep", "member_sweeps"],
                "carried_grids_m": sorted(carried["grids"]),
                "note": "PMixED measured again; the rest carried from the run above. Members retrained by the same "
                "seeds and recipes; each grid's Rényi ball points are carried when the retrained members' mean "
                "perplexity equals the carried one (same members), else scored again; grids already measured with "
                "the box under the same settings (carried_grids_m) are carried whole, with their sweeps and splits",
            },
        )
    else:
        noise_at_8 = noise_multiplier_for(owners_config(settings, max(EPSILONS)), settings.batch / len(union))
        dpsgd_sweep = sweep_dpsgd(base, task, settings, first, noise_at_8)
        lr = dpsgd_sweep["chosen"]["lr"]
        stage(ppl=ppl, sweep=dpsgd_sweep)

        runs = {}
        model = fresh_adapter(base, settings, seed=100)
        runs["fine_tuned"] = dataclasses.asdict(
            train_nonprivate(model, union, settings.steps, settings.batch, lr, seed=100)
        )
        ppl["fine_tuned"] = scorer.perplexity(top_blocks(base, model, first))
        del model
        print(f"fine-tuned {ppl['fine_tuned']:.2f}")
        stage(ppl=ppl, runs=runs)

        ppl["dpsgd"], runs["dpsgd"] = {}, {}
        for eps in sorted(EPSILONS, reverse=True):
            model = fresh_adapter(base, settings, seed=200)
            run = train_private(model, union, settings, owners_config(settings, eps), lr, seed=200)
            ppl["dpsgd"][str(eps)] = scorer.perplexity(top_blocks(base, model, first))
            runs["dpsgd"][str(eps)] = dataclasses.asdict(run)
            del model
            print(f"DP-SGD eps {run.epsilon:.3g} (sigma {run.noise_multiplier:.3g}): {ppl['dpsgd'][str(eps)]:.2f}")
            stage(ppl=ppl, runs=runs, gap_recovered=gaps(ppl))

    grids: list[dict[str, Any]] = []
    member_sweeps: list[dict[str, Any]] = []
    split_choices: list[dict[str, Any]] = []
    for m in settings.shards:
        if carried is not None and m in carried["grids"]:
            member_sweeps.append(carried["member_sweeps"][m])
            split_choices.append(carried["box_split_choices"][m])
            grids.append(carried["grids"][m])
            print(f"PMixED m={m}: carried")
            continue
        if carried is not None and m in carried["member_sweeps"]:
            member_sweeps.append(carried["member_sweeps"][m])
        else:
            member_sweeps.append(sweep_members(base, task, settings, first, m))
        recipe = MemberRecipe(**member_sweeps[-1]["chosen"])
        print(f"PMixED m={m}: member recipe {recipe} (public sweep)")
        split_choices.append(choose_splits(base, task, settings, first, m, recipe))
        print(f"PMixED m={m}: box splits {split_choices[-1]['chosen']} (public data)")
        stage(member_sweeps=member_sweeps, box_split_choices=split_choices)
        members = settings.owners * m
        logits, member_runs = member_logits(base, scorer, first, owner_rows, examples, settings, m, recipe)
        scored = pmixed_grid(
            scorer, public_logits, logits, box_budgets(settings, members, chosen_splits(split_choices[-1]))
        )
        points, seconds = scored["points"], scored["score_seconds"]
        previous = carried["renyi"].get(m) if carried is not None else None
        if previous is not None and math.isclose(
            previous["members_ppl_mean"], scored["members_ppl_mean"], rel_tol=1e-9
        ):
            points = previous["points"] + points
        else:
            renyi = pmixed_grid(scorer, public_logits, logits, pmixed_budgets(settings, members))
            points, seconds = renyi["points"] + points, seconds + renyi["score_seconds"]
        del logits
        grids.append(
            {
                "m": m,
                "members": members,
                "members_ppl_mean": scored["members_ppl_mean"],
                "member_recipe": dataclasses.asdict(recipe),
                "points": points,
                "member_runs": runs_summary(member_runs),
                "score_seconds": seconds,
            }
        )
        best = best_pmixed(grids)
        ppl["pmixed"] = {str(eps): point["ppl"] for eps, point in sorted(best.items())}
        print(
            f"PMixED m={m}: "
            + ", ".join(f"eps {e:g}: {p['ppl']:.2f} ({p['projection']})" for e, p in sorted(best.items()))
        )
        stage(
            ppl=ppl,
            runs=runs,
            pmixed_grids=grids,
            pmixed_best={str(e): p for e, p in best.items()},
            gap_recovered=gaps(ppl),
        )

    targets = {"dpsgd": 0.6, "pmixed": 0.4}
    gap = gaps(ppl)
    results["targets_at_epsilon_8"] = targets_reached(ppl, gap, targets)
    print_table(
        f"held-out perplexity ({len(heldout)} blocks x {settings.block} tokens); gap recovered in brackets",
        ["method", *[f"eps {e:g}" for e in EPSILONS]],
        [
            ["public", *[ppl["public"]] * len(EPSILONS)],
            ["fine-tuned (non-private)", *[ppl["fine_tuned"]] * len(EPSILONS)],
            *[
                [method, *[f"{ppl[method][str(e)]:.2f} ({gap[method][str(e)]:.2f})" for e in EPSILONS]]
                for method in ("dpsgd", "pmixed")
            ],
        ],
    )
    plot(results | {"ppl": ppl, "pmixed_grids": grids}, RESULTS_DIR / f"{name}.png")
    results["wall_seconds"] = time.perf_counter() - began
    write_results(name, {**results, "ppl": ppl, "gap_recovered": gap, "complete": True})


def _pad_to(rows: torch.Tensor, width: int) -> torch.Tensor:
    """Rows padded with PAD to ``width`` columns, so owners' record tensors concatenate."""
    return nn.functional.pad(rows, (0, width - rows.shape[1]), value=PAD)


if __name__ == "__main__":
    main()
