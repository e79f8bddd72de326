"""The packed ensemble forward against each member's own full forward, and PMixED sampling over it."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from privtune.common.errors import PrivtuneError
from privtune.common.models import TinySpec, tiny_model
from privtune.common.offsite import OffsiteConfig, adapter_manifest, adapter_state, plug_in
from privtune.common.offsite.adapter import embedding_tensors
from privtune.common.offsite.synthetic import perturbed_adapter
from privtune.common.pmixed import PMixedBudget, mixture_distribution, project
from privtune.common.pmixed.ensemble import Ensemble, MemberAdapter
from privtune.common.ult.relabel import relabel_model


def tiny(family: str) -> torch.nn.Module:
    return tiny_model(family, spec=TinySpec(n_layers=5, hidden=32, heads=4, max_positions=64)).double()


def member(base: torch.nn.Module, cfg: OffsiteConfig, seed: int) -> MemberAdapter:
    """An adapter moved away from the base (LoRA's B starts at 0, so an untrained one changes nothing)."""
    model = perturbed_adapter(base, cfg, seed, scale=0.1)
    return MemberAdapter(f"owner-{seed}", adapter_state(model), adapter_manifest(model))


def reference(models: list[torch.nn.Module], tokens: list[int]) -> torch.Tensor:
    """Last-position logits of each model's own forward over the whole sequence, without any cache."""
    ids = torch.tensor([tokens])
    with torch.no_grad():
        return torch.stack([m(ids).logits[0, -1] for m in models])


@pytest.mark.parametrize("family", ["gpt2", "llama", "opt"])
@pytest.mark.parametrize("kind", ["lora", "full"])
def test_packed_forward_equals_separate_forwards_over_cached_steps(family, kind):
    base = tiny(family)
    cfg = OffsiteConfig(k_bottom=2, k_top=1, n_emulator=2, adapter=kind, lora_r=4, lora_alpha=8)
    members = [member(base, cfg, seed) for seed in range(1, 5)]
    ensemble = Ensemble(base, members)
    if kind == "lora":  # one shared copy per adapter block, p0 routed through it too
        for i in ensemble.own_blocks[0]:
            assert all(own[i] is ensemble.own_blocks[0][i] for own in ensemble.own_blocks)
            assert ensemble.block_for(-1, i) is ensemble.own_blocks[0][i] is not ensemble.base_blocks[i]
    full = [plug_in(base, m.state, m.manifest) for m in members]
    rng = np.random.default_rng(0)
    session = ensemble.session([5, 6, 7, 8, 9, 10])
    # Subsets of every size, with members sitting out steps so their caches must catch up.
    subsets = [[], [2], [0, 3], [0, 1, 2, 3], [1], [], [1, 3], [0, 2], [3], [0, 1, 2, 3]]
    for chosen in subsets:
        got = session.logits(chosen)
        want = reference([base] + [full[c] for c in chosen], session.tokens)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
        session.extend([int(rng.integers(3, 259))])
    assert all(session.cached_length(m) == len(session.tokens) - 1 for m in range(4))
    # Prefilling every row in one pass caches the same keys as lazy catch-up does.
    prefilled = ensemble.session(session.tokens)
    prefilled.prefill(range(4))
    assert all(prefilled.cached_length(r) == len(session.tokens) - 1 for r in (-1, 0, 1, 2, 3))
    torch.testing.assert_close(prefilled.logits([1, 3]), session.logits([1, 3]), rtol=0, atol=1e-10)
    # Members really differ from p0 and from each other, so the equality is not trivial.
    logits = session.logits([0, 1, 2, 3])
    assert (logits[1:] - logits[0]).abs().amax(dim=1).min() > 1e-3
    assert (logits[1] - logits[2]).abs().max() > 1e-3


def test_members_with_different_adapter_blocks_share_the_rest():
    base = tiny("llama")
    a = member(base, OffsiteConfig(k_bottom=1, k_top=1, n_emulator=1, adapter="lora", lora_r=2, lora_alpha=4), 1)
    b = member(base, OffsiteConfig(k_bottom=2, k_top=0, n_emulator=1, adapter="full"), 2)
    ensemble = Ensemble(base, [a, b])
    assert set(ensemble.own_blocks[0]) == {0, 4} and set(ensemble.own_blocks[1]) == {0, 1}
    assert ensemble.block_for(0, 2) is ensemble.block_for(1, 2) is ensemble.base_blocks[2]
    full = [plug_in(base, m.state, m.manifest) for m in (a, b)]
    session = ensemble.session([3, 4, 5])
    for chosen in ([1], [0, 1], [0]):
        torch.testing.assert_close(
            session.logits(chosen), reference([base] + [full[c] for c in chosen], session.tokens), rtol=0, atol=1e-10
        )
        session.extend([42])


def test_asking_twice_at_the_same_length_gives_the_same_logits():
    base = tiny("gpt2")
    ensemble = Ensemble(base, [member(base, OffsiteConfig(k_bottom=1, k_top=1, n_emulator=1), 1)])
    session = ensemble.session([7, 8, 9])
    first = session.logits([0])
    torch.testing.assert_close(session.logits([0]), first, rtol=0, atol=1e-12)
    assert session.cached_length(0) == 3


def test_private_next_token_follows_the_expected_mixture():
    """Empirical token law of private_next_token == sum over S of P(S) * mixture(S), by chi-square."""
    from scipy.stats import chisquare

    base = tiny("llama")
    with torch.no_grad():  # sharpen the random model's near-uniform next-token law, so cells fill unevenly
        base.model.norm.weight.mul_(30.0)
    cfg = OffsiteConfig(k_bottom=1, k_top=1, n_emulator=1, adapter="full")
    ensemble = Ensemble(base, [member(base, cfg, 1), member(base, cfg, 2)])
    # A budget loose enough that the members move the law visibly, with both λ strictly inside (0, 1).
    budget = PMixedBudget(epsilon=14.0, delta=1e-5, alpha=3, T=1, q=0.4, n_members=2)
    session = ensemble.session([10, 11, 12])
    probs = session.probs([0, 1])
    lambdas = project(probs[1:], probs[0], budget.alpha, budget.beta()).lambdas
    assert ((lambdas > 0.05) & (lambdas < 0.95)).all()
    expected = torch.zeros_like(probs[0])
    for subset in itertools.chain.from_iterable(itertools.combinations(range(2), k) for k in range(3)):
        weight = budget.q ** len(subset) * (1 - budget.q) ** (2 - len(subset))
        rows = probs[[1 + i for i in subset]] if subset else None
        expected += weight * mixture_distribution(rows, probs[0], budget.alpha, budget.beta())
    rng = np.random.default_rng(7)
    n = 1000
    counts = np.bincount([session.private_next_token(budget, rng) for _ in range(n)], minlength=len(expected))
    # Cells: the likeliest tokens (expected count >= 10) and the rest pooled into one.
    order = np.argsort(-expected.numpy())
    top = order[expected.numpy()[order] * n >= 10][:20]
    observed = np.append(counts[top], n - counts[top].sum())
    wanted = np.append(expected.numpy()[top], 1 - expected.numpy()[top].sum()) * n
    assert wanted.min() >= 5
    assert chisquare(observed, wanted).pvalue > 1e-3
    # ... and the test has the power to tell that law from p0's alone.
    assert 0.5 * float((expected - probs[0]).abs().sum()) > 0.1
    public_only = np.append(probs[0].numpy()[top], 1 - probs[0].numpy()[top].sum()) * n
    assert chisquare(observed, public_only).pvalue < 1e-6


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_keyed_members_and_keyed_p0(family):
    """ULT carry_embeddings mode: embedding and head per row, p0 on the key holder's relabelled rows;
    every row still equals that model's own forward."""
    base = tiny(family)
    cfg = OffsiteConfig(k_bottom=1, k_top=1, n_emulator=1, carry_embeddings=True)
    members = [member(base, cfg, seed) for seed in (1, 2, 3)]
    rows = torch.randperm(base.config.vocab_size, generator=torch.Generator().manual_seed(0))
    ensemble = Ensemble(base, members, embedding_tensors(relabel_model(base, rows)))
    assert set(ensemble.own_embeddings) == {0, 1, 2}
    full = [plug_in(base, m.state, m.manifest) for m in members]
    session = ensemble.session([20, 21, 22, 23])
    for chosen in ([0, 2], [], [1], [0, 1, 2]):
        torch.testing.assert_close(
            session.logits(chosen),
            reference([relabel_model(base, rows)] + [full[c] for c in chosen], session.tokens),
            rtol=0,
            atol=1e-10,
        )
        session.extend([99])


def test_keyed_members_need_a_keyed_p0_and_plain_members_refuse_one():
    base = tiny("gpt2")
    keyed = member(base, OffsiteConfig(k_bottom=1, k_top=1, n_emulator=1, carry_embeddings=True), 1)
    plain = member(base, OffsiteConfig(k_bottom=1, k_top=1, n_emulator=1), 2)
    with pytest.raises(PrivtuneError, match="keyed-public"):
        Ensemble(base, [keyed])
    with pytest.raises(PrivtuneError, match="serve without them"):
        Ensemble(base, [plain], embedding_tensors(base))
    with pytest.raises(PrivtuneError, match="different federations"):
        Ensemble(base, [keyed, plain], embedding_tensors(base))


def test_sequences_beyond_the_model_positions_are_refused():
    base = tiny("gpt2")
    session = Ensemble(base, [member(base, OffsiteConfig(k_bottom=1, k_top=1, n_emulator=1), 1)]).session([5] * 60)
    with pytest.raises(PrivtuneError, match="64 positions"):
        session.extend([5] * 5)
    with pytest.raises(PrivtuneError, match="prompt is empty"):
        session.ensemble.session([])


def test_lora_members_cost_their_factors_not_block_copies():
    base = tiny("llama")
    lora = OffsiteConfig(k_bottom=1, k_top=1, n_emulator=1, adapter="lora", lora_r=2, lora_alpha=4)
    full = OffsiteConfig(k_bottom=1, k_top=1, n_emulator=1, adapter="full")
    block_bytes = sum(p.numel() * p.element_size() for i in (0, 4) for p in base.model.layers[i].parameters())
    full_ensemble = Ensemble(base, [member(base, full, seed) for seed in (1, 2, 3)])
    assert full_ensemble.extra_bytes() == 3 * block_bytes
    lora_members = [member(base, lora, seed) for seed in (1, 2, 3)]
    factor_bytes = sum(t.numel() * t.element_size() for m in lora_members for n, t in m.state.items() if "lora_" in n)
    assert Ensemble(base, lora_members).extra_bytes() == block_bytes + factor_bytes  # one shared copy per block


def test_private_next_token_runs_every_member_whatever_s():
    """Constant work per query: even when S is almost always empty, every member's cache advances each token."""
    base = tiny("gpt2")
    cfg = OffsiteConfig(k_bottom=1, k_top=1, n_emulator=1)
    ensemble = Ensemble(base, [member(base, cfg, seed) for seed in (1, 2, 3)])
    budget = PMixedBudget(epsilon=8.0, delta=1e-5, alpha=3, T=8, q=1e-6, n_members=3)
    session = ensemble.session([5, 6, 7])
    rng = np.random.default_rng(1)
    for _ in range(3):
        session.extend([session.private_next_token(budget, rng)])
        assert [session.cached_length(m) for m in range(3)] == [len(session.tokens) - 1] * 3
