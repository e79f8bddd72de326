"""bench.utility's pure pieces: the gap ratio, the top-block scorer, the PMixED grid's headline, the scoring."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bench import utility
from bench.heldout import mixture_nll
from privtune.common.dpsgd import PAD, noise_multiplier_for
from privtune.common.errors import PrivtuneError
from privtune.common.families import num_blocks
from privtune.common.models import load_model
from privtune.common.pmixed import Box, PMixedBudget, best_budget, project_box


def test_gap_recovered_is_the_share_of_the_fine_tuning_gain_kept():
    assert utility.gap_recovered(100.0, 60.0, 100.0) == 0.0
    assert utility.gap_recovered(100.0, 60.0, 60.0) == 1.0
    assert utility.gap_recovered(100.0, 60.0, 90.0) == pytest.approx(0.25)
    assert utility.gap_recovered(100.0, 60.0, 110.0) == pytest.approx(-0.25)


@pytest.mark.parametrize("family", ["tiny-llama", "tiny-gpt2"])
def test_top_scorer_matches_the_full_forward_of_an_adapted_model(family):
    torch.manual_seed(0)
    base = load_model(family).model.eval()
    settings = utility.Settings(k_top=1, lora_r=2)
    model = utility.fresh_adapter(base, settings, seed=0)
    with torch.no_grad():
        for p in utility.trainable(model):
            p.add_(0.1 * torch.randn_like(p))  # LoRA B starts at zero: make the adapter change something
    first = num_blocks(base) - settings.k_top
    blocks = torch.randint(0, 50, (3, 12))
    scorer = utility.TopScorer(base, blocks, first)
    with torch.no_grad():
        expected = torch.softmax(model(blocks).logits[1, :-1].double(), dim=-1)
        public = torch.softmax(base(blocks).logits[1, :-1].double(), dim=-1)
    adapted = scorer.probs(utility.top_blocks(base, model, first), 1)
    assert torch.allclose(adapted, expected, atol=1e-5)
    logits = scorer.next_logits(utility.top_blocks(base, model, first))
    assert torch.equal(torch.softmax(logits[1].double(), dim=-1), adapted)
    assert torch.allclose(scorer.probs(utility.public_top(base, first), 1), public, atol=1e-5)
    assert not torch.allclose(adapted, public, atol=1e-3)


def test_the_pmixed_headline_is_the_best_point_per_epsilon_over_every_m():
    grids = [
        {"m": 1, "members": 4, "points": [{"epsilon": 8.0, "ppl": 90.0}, {"epsilon": 1.0, "ppl": 99.0}]},
        {"m": 2, "members": 8, "points": [{"epsilon": 8.0, "ppl": 85.0}, {"epsilon": 1.0, "ppl": 99.5}]},
    ]
    best = utility.best_pmixed(grids)
    assert best[8.0] == {"epsilon": 8.0, "ppl": 85.0, "m": 2, "members": 8}
    assert best[1.0]["m"] == 1 and best[1.0]["ppl"] == 99.0


def test_mixture_nll_is_public_alone_when_s_is_always_empty_and_mixes_members_otherwise():
    generator = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(3, 5, 7, generator=generator, dtype=torch.float64), dim=-1)
    targets = torch.tensor([0, 1, 2, 3, 4])
    public_nll = -float(torch.log(probs[0, torch.arange(5), targets]).sum())
    rare = PMixedBudget(8.0, 1e-5, 3, 1024, 1e-12, 2)  # S is empty at every position (probability 1 - 2e-12)
    often = PMixedBudget(8.0, 1e-5, 3, 1024, 0.5, 2)
    nll = mixture_nll(
        probs, targets, {"rare": rare, "often": often}, {k: np.random.default_rng(0) for k in ("rare", "often")}
    )
    assert nll["rare"] == pytest.approx(public_nll)
    assert nll["often"] != pytest.approx(public_nll) and math.isfinite(nll["often"])


def test_owners_record_tensors_pad_to_one_width():
    rows = torch.tensor([[5, 6, PAD], [7, 8, 9]])
    padded = utility._pad_to(rows, 5)
    assert padded.shape == (2, 5) and bool((padded[:, 3:] == PAD).all()) and torch.equal(padded[:, :3], rows)


def test_pmixed_budgets_keep_the_feasible_orders_of_largest_radius():
    settings = utility.Settings(qs=(0.02,), alphas_kept=2)
    budgets = utility.pmixed_budgets(settings, 8)
    assert {b.epsilon for b in budgets} == set(utility.EPSILONS) and {b.projection for b in budgets} == {"renyi"}
    for eps in utility.EPSILONS:
        kept = {b.alpha for b in budgets if b.epsilon == eps}
        assert len(kept) == 2
        radius = {}
        for alpha in settings.alpha_candidates:
            try:
                radius[alpha] = alpha * PMixedBudget(eps, 1e-5, alpha, utility.QUERIES, 0.02, 8).beta()
            except PrivtuneError:
                continue
        assert kept == set(sorted(radius, key=radius.get)[-2:])
    assert all(b.alpha > 3 for b in budgets if b.epsilon == 1.0)  # epsilon 1 is out of reach at order 3


def test_targets_state_the_gain_the_ratio_divides_by():
    ppl = {"public": 100.0, "fine_tuned": 99.0}
    gap = {"dpsgd": {"8.0": 0.7}, "pmixed": {"8.0": 0.2}}
    verdict = utility.targets_reached(ppl, gap, {"dpsgd": 0.6, "pmixed": 0.4})
    assert verdict["fine_tuning_gain_ppl"] == 1.0
    assert verdict["dpsgd"]["reached"] and not verdict["pmixed"]["reached"]


def test_pmixed_members_share_one_fine_tuning_run_of_records():
    settings = utility.Settings(batch=128)
    assert settings.member_batch(16) * 16 == 128
    assert settings.member_batch(8) * 8 == 128
    assert settings.member_batch(256) == 1  # never an empty batch


def test_the_owners_plan_adds_less_noise_at_a_larger_epsilon_with_the_fixed_clip():
    settings = utility.Settings()
    configs = [utility.owners_config(settings, eps) for eps in utility.EPSILONS]
    noise = [noise_multiplier_for(config, settings.batch / 30_000) for config in configs]
    assert noise == sorted(noise, reverse=True) and len(set(noise)) == len(noise)
    assert {config.max_grad_norm for config in configs} == {settings.clip}
    assert {config.total_steps for config in configs} == {settings.steps}


def test_member_schedules_process_the_member_batch_records_in_more_smaller_steps():
    settings = utility.Settings(batch=128, steps=6, member_step_factors=(1, 2, 3))
    assert settings.member_schedules(16) == [(6, 8), (12, 4)]  # 8 records do not split in 3
    assert all(steps * batch == 6 * 8 for steps, batch in settings.member_schedules(16))
    assert settings.member_schedules(256) == [(6, 1)]


def test_a_sweep_scores_every_model_of_a_candidate_and_picks_the_lowest_mean():
    torch.manual_seed(0)
    base = load_model("tiny-llama").model.eval()
    settings = utility.Settings(k_top=1, lora_r=2)
    first = num_blocks(base) - settings.k_top
    scorer = utility.TopScorer(base, torch.randint(0, 50, (2, 12)), first)
    task = utility.PublicTask(torch.randint(0, 50, (6, 4)), scorer, scorer.perplexity(utility.public_top(base, first)))

    def train(candidate, seed):
        for shard in range(2):
            model = utility.fresh_adapter(base, settings, seed=seed)
            with torch.no_grad():
                for p in utility.trainable(model):
                    p.add_(candidate["scale"] * (shard + 1) * torch.randn_like(p))
            yield model, utility.Run(1, 1, 1.0, 4.0, 0.0, candidate["scale"])

    result = utility.sweep(base, first, task, [{"scale": 0.0}, {"scale": 3.0}], train, seed=0)
    untouched, perturbed = result["points"]
    assert untouched["ppls"] == [pytest.approx(task.public_ppl)] * 2
    assert (
        perturbed["ppl"] == pytest.approx(np.mean(perturbed["ppls"])) and perturbed["ppls"][0] != perturbed["ppls"][1]
    )
    assert perturbed["ppl"] > untouched["ppl"]  # random adapter weights make a random model's guesses worse
    assert result["chosen"] == {"scale": 0.0} and len(perturbed["runs"]) == 2


def test_box_budgets_use_the_chosen_split_at_the_order_of_widest_box():
    settings = utility.Settings(box_qs=(1.0,))
    splits = {(eps, 1.0): split for eps, split in zip(utility.EPSILONS, (0.3, 0.5, 0.85))}
    budgets = utility.box_budgets(settings, 16, splits)
    assert [(b.epsilon, b.split, b.projection, b.q) for b in budgets] == [
        (eps, split, "box", 1.0) for eps, split in zip(utility.EPSILONS, (0.3, 0.5, 0.85))
    ]
    for budget in budgets:
        assert budget == best_budget(budget.epsilon, 1e-5, utility.QUERIES, 1.0, 16, "box", budget.split)
        assert utility.grid_point(budget) == {
            "epsilon": budget.epsilon,
            "alpha": budget.alpha,
            "q": 1.0,
            "projection": "box",
            "split": budget.split,
            "lower": budget.box().lower,
            "upper": budget.box().upper,
        }


def test_box_nll_scores_the_mean_of_the_projected_members_and_mixture_nll_agrees_at_q_one():
    generator = torch.Generator().manual_seed(1)
    probs = torch.softmax(torch.randn(4, 6, 9, generator=generator, dtype=torch.float64), dim=-1)
    targets = torch.tensor([0, 3, 8, 1, 2, 5])
    budget = PMixedBudget(8.0, 1e-5, 4, 1024, 1.0, 3, projection="box", split=0.7)
    box = budget.box()
    expected = -sum(
        math.log(float(project_box(probs[1:, t], probs[0, t], box).mean(dim=0)[targets[t]])) for t in range(6)
    )
    assert utility.box_nll(probs, targets, {"b": box})["b"] == pytest.approx(expected, rel=1e-12)
    assert mixture_nll(probs, targets, {"b": budget}, {"b": np.random.default_rng(0)})["b"] == pytest.approx(
        expected, rel=1e-12
    )
    narrow = utility.box_nll(probs, targets, {"n": Box(1e-4, 1e-4)})["n"]
    public_nll = -float(torch.log(probs[0, torch.arange(6), targets]).sum())
    assert narrow == pytest.approx(public_nll, rel=1e-3) and expected != pytest.approx(public_nll, rel=1e-3)
