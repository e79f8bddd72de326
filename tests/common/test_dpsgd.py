"""DP-SGD helper: accounting against an independent RDP computation, exact clipped per-example
gradients on tiny GPT-2 / LLaMA / OPT (LoRA and whole adapter blocks), frozen parameters untouched,
and budget refusals before any training. Record-level DP: a record of several blocks' worth of
tokens gives one clipped gradient, padding adds nothing, the sample rate is over records, and the
ledger names the unit."""

import copy
import math

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from scipy.special import gammaln, logsumexp

from privtune.common.dpsgd import (
    PAD,
    DpSgdConfig,
    block_unit,
    epsilon_for,
    lm_per_sample_loss,
    noise_multiplier_for,
    plan_round,
    record_examples,
    record_unit,
    train_round,
)
from privtune.common.errors import BudgetExceededError, PrivtuneError
from privtune.common.families import get_blocks
from privtune.common.ledger import Ledger
from privtune.common.models import TinySpec, tiny_model

SPEC = TinySpec(n_layers=4, hidden=32, heads=4, max_positions=64)


pytestmark = pytest.mark.usefixtures("one_thread")


LORA_TARGETS = {"gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"], "opt": ["q_proj", "v_proj", "fc1"]}


# ---------------------------------------------------------------- accounting
def independent_epsilon(history, delta, orders):
    """Subsampled-Gaussian RDP at integer orders by the binomial expansion (Mironov, Talwar, Zhang 2019,
    Sec. 3.3): A_a = sum_k C(a,k) (1-q)^(a-k) q^k exp((k^2-k) / (2 sigma^2)), RDP = ln(A_a) / (a-1) per
    step; composed by adding; converted with eps = rdp + ln((a-1)/a) - (ln delta + ln a)/(a-1)."""
    orders = np.asarray(orders, dtype=float)
    total = np.zeros_like(orders)
    for sigma, q, steps in history:
        for i, a in enumerate(orders.astype(int)):
            k = np.arange(a + 1)
            log_terms = (
                gammaln(a + 1)
                - gammaln(k + 1)
                - gammaln(a - k + 1)
                + (a - k) * np.log1p(-q)
                + k * np.log(q)
                + (k * k - k) / (2 * sigma**2)
            )
            total[i] += steps * logsumexp(log_terms) / (a - 1)
    eps = total + np.log((orders - 1) / orders) - (np.log(delta) + np.log(orders)) / (orders - 1)
    return float(eps.min())


@pytest.mark.parametrize(
    "history",
    [
        [(1.1, 0.01, 1000)],
        [(0.9, 0.05, 300)],
        [(2.0, 0.2, 60)],
        [(1.0, 0.02, 500), (1.5, 0.04, 200)],  # two rounds with different noise and sampling
    ],
)
def test_epsilon_matches_an_independent_rdp_computation(history):
    orders = range(2, 64)
    ours = epsilon_for(history, 1e-5, orders=orders)
    assert ours == pytest.approx(independent_epsilon(history, 1e-5, orders), rel=1e-6)
    # Opacus' default orders add fractional ones: never worse, and not far better
    default = epsilon_for(history, 1e-5)
    assert 0.9 * ours <= default <= ours + 1e-9


def test_noise_multiplier_is_solved_for_the_target():
    config = DpSgdConfig(target_epsilon=3.0, total_steps=400)
    sigma = noise_multiplier_for(config, 0.05)
    reached = epsilon_for([(sigma, 0.05, 400)], config.delta)
    assert 2.98 <= reached <= 3.0
    by_epochs = noise_multiplier_for(DpSgdConfig(target_epsilon=3.0, total_epochs=20), 0.05)  # 20 / 0.05 steps
    assert by_epochs == pytest.approx(sigma)


def test_noise_multiplier_over_a_schedule_reaches_the_target_over_all_of_it():
    """A federated track over the whole data and two member shards at their own sample rates."""
    schedule = ((0.05, 300), (0.1, 100), (0.1, 100))
    sigma = noise_multiplier_for(DpSgdConfig(target_epsilon=3.0, schedule=schedule), 0.05)
    reached = epsilon_for([(sigma, q, n) for q, n in schedule], 1e-5)
    assert 0.99 * 3.0 <= reached <= 3.0
    one_part = noise_multiplier_for(DpSgdConfig(target_epsilon=3.0, schedule=((0.05, 400),)), 0.05)
    assert one_part == pytest.approx(
        noise_multiplier_for(DpSgdConfig(target_epsilon=3.0, total_steps=400), 0.05), rel=0.01
    )
    with pytest.raises(PrivtuneError, match="exactly one of total_steps, total_epochs and schedule"):
        DpSgdConfig(target_epsilon=3.0, total_steps=10, schedule=schedule)
    with pytest.raises(PrivtuneError, match="sample rates in"):
        DpSgdConfig(target_epsilon=3.0, schedule=((1.5, 10),))


def test_config_is_validated():
    with pytest.raises(PrivtuneError):
        DpSgdConfig()
    with pytest.raises(PrivtuneError):
        DpSgdConfig(noise_multiplier=1.0, target_epsilon=2.0)
    with pytest.raises(PrivtuneError):
        DpSgdConfig(target_epsilon=2.0)


# ---------------------------------------------------------------- training
def adapter_model(family, mode):
    """A tiny model whose first and last blocks are the adapter: LoRA on them, or the whole blocks trainable."""
    model = tiny_model(family, spec=SPEC)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for attr in ("dropout", "attention_dropout", "activation_dropout"):
            if isinstance(getattr(module, attr, None), float):
                setattr(module, attr, 0.0)
    model.requires_grad_(False)
    adapter = [0, SPEC.n_layers - 1]
    if mode == "lora":
        return get_peft_model(
            model,
            LoraConfig(
                r=2,
                lora_alpha=4,
                lora_dropout=0.0,
                target_modules=LORA_TARGETS[family],
                layers_to_transform=adapter,
                init_lora_weights=False,
            ),
        )
    for i in adapter:
        get_blocks(model)[i].requires_grad_(True)
    return model


def examples(n, length=12, seed=0):
    return torch.randint(3, 259, (n, length), generator=torch.Generator().manual_seed(seed))


def per_example_loss(model, ids):
    logits = model(input_ids=ids).logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


CASES = [(f, m) for f in ("gpt2", "llama", "opt") for m in ("lora", "full")]


@pytest.mark.parametrize("family,mode", CASES)
def test_one_step_applies_exactly_the_clipped_mean_of_per_example_gradients(family, mode):
    """q = 1 (every example in the batch), negligible noise: the update must be -lr * mean_i clip(g_i)."""
    model = adapter_model(family, mode)
    reference = copy.deepcopy(model)
    data, clip, lr = examples(6), 0.05, 1.0
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    expected = {n: torch.zeros_like(p) for n, p in trainable.items()}
    for row in data:
        reference.zero_grad()
        per_example_loss(reference, row[None]).backward()
        grads = {n: p.grad.detach().clone() for n, p in reference.named_parameters() if p.requires_grad}
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values()))
        factor = min(1.0, clip / (float(norm) + 1e-6))
        assert factor < 1.0, "test design: clipping must be active"
        for n in expected:
            expected[n] -= lr * factor * grads[n] / len(data)
    optimizer = torch.optim.SGD(list(trainable.values()), lr=lr)
    train_round(
        model,
        optimizer,
        data,
        sample_rate=1.0,
        batch_size=len(data),
        steps=1,
        config=DpSgdConfig(noise_multiplier=1e-12, max_grad_norm=clip),
        seed=0,
    )
    for name, p in model.named_parameters():
        if name in trainable:
            torch.testing.assert_close(p.detach() - before[name], expected[name], rtol=1e-4, atol=1e-7)
        else:
            assert torch.equal(p, before[name]), f"frozen {name} changed"


@pytest.mark.parametrize("family,mode", CASES)
def test_only_adapter_modules_are_hooked_and_only_adapter_parameters_change(family, mode):
    model = adapter_model(family, mode)
    keys = list(model.state_dict())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    hooked_during_round = set()

    def spying_loss(private, batch, labels):
        for name, module in model.named_modules():
            if module._forward_hooks:
                hooked_during_round.add(name)
                assert any(p.requires_grad for p in module.parameters(recurse=False)), f"frozen module {name} hooked"
        from privtune.common.dpsgd import lm_per_sample_loss

        return lm_per_sample_loss(private, batch, labels)

    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    result = train_round(
        model,
        optimizer,
        examples(24),
        sample_rate=8 / 24,
        batch_size=8,
        steps=3,
        config=DpSgdConfig(noise_multiplier=1.0),
        loss_fn=spying_loss,
        seed=1,
    )
    assert hooked_during_round and len(result.losses) >= 1
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable
    assert list(model.state_dict()) == keys  # the OPT wrappers are gone again
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())
    assert not any(hasattr(p, "grad_sample") and p.grad_sample is not None for p in model.parameters())
    assert result.epsilon == pytest.approx(epsilon_for([(1.0, 8 / 24, 3)], 1e-5))


def test_empty_poisson_batches_still_take_a_noise_only_step():
    model = adapter_model("gpt2", "lora")
    calls = []

    def counting_loss(private, batch, labels):
        calls.append(len(batch))
        from privtune.common.dpsgd import lm_per_sample_loss

        return lm_per_sample_loss(private, batch, labels)

    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    result = train_round(
        model,
        optimizer,
        examples(50),
        sample_rate=1 / 50,
        batch_size=1,
        steps=12,
        config=DpSgdConfig(noise_multiplier=1.0),
        loss_fn=counting_loss,
        seed=3,
    )
    assert len(calls) < 12, "test design: the seed must produce at least one empty batch"
    assert result.plan.steps == 12


def test_a_token_flattening_layer_is_refused_rather_than_clipped_per_token():
    """A trainable layer that sees (batch*seq, features) inputs would be clipped per token: refused."""
    model = adapter_model("gpt2", "full")
    block = get_blocks(model)[0]
    original = block.mlp.forward

    def flattened(hidden):
        return original(hidden.reshape(-1, 1, hidden.shape[-1])).reshape(hidden.shape)

    block.mlp.forward = flattened
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with pytest.raises(PrivtuneError, match="per-example gradients of"):
        train_round(
            model,
            optimizer,
            examples(8),
            sample_rate=1.0,
            batch_size=8,
            steps=1,
            config=DpSgdConfig(noise_multiplier=1.0),
        )


def test_optimizer_must_hold_trainable_parameters_only():
    model = adapter_model("llama", "lora")
    with pytest.raises(PrivtuneError, match="trainable"):
        train_round(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            examples(8),
            sample_rate=0.5,
            batch_size=4,
            steps=1,
            config=DpSgdConfig(noise_multiplier=1.0),
        )


# ---------------------------------------------------------------- budgets
def test_rounds_accumulate_in_the_ledger_and_the_round_over_budget_is_refused_before_training(tmp_path):
    path = tmp_path / "alice.db"
    Ledger(path, owner="alice").set_budget("dpsgd", 2.0, delta=1e-5)
    config = DpSgdConfig(target_epsilon=2.0, total_steps=8)
    data = examples(32)
    model = adapter_model("opt", "lora")
    for round_number in range(2):
        ledger = Ledger(path)  # a fresh process per round would do the same
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        result = train_round(
            model,
            optimizer,
            data,
            sample_rate=0.125,
            batch_size=4,
            steps=4,
            config=config,
            ledger=ledger,
            seed=round_number,
        )
    sigma = result.plan.noise_multiplier
    assert result.epsilon == pytest.approx(epsilon_for([(sigma, 0.125, 4), (sigma, 0.125, 4)], 1e-5))
    assert result.epsilon == pytest.approx(independent_epsilon([(sigma, 0.125, 8)], 1e-5, range(2, 64)), rel=0.1)
    assert 1.98 <= result.epsilon <= 2.0
    assert Ledger(path).total("dpsgd") == pytest.approx(result.epsilon)

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with pytest.raises(BudgetExceededError):
        plan_round(config, 0.125, 1, Ledger(path))
    with pytest.raises(BudgetExceededError):
        train_round(
            model, optimizer, data, sample_rate=0.125, batch_size=4, steps=1, config=config, ledger=Ledger(path)
        )
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert len(Ledger(path).records("dpsgd")) == 2


def test_ledger_budget_refuses_a_round_with_a_given_noise_multiplier(tmp_path):
    ledger = Ledger(tmp_path / "bob.db", owner="bob")
    ledger.set_budget("dpsgd", 1.0, delta=1e-5)
    config = DpSgdConfig(noise_multiplier=2.0)
    plan = plan_round(config, 0.05, 5, ledger)
    assert 0 < plan.epsilon_after <= 1.0
    with pytest.raises(BudgetExceededError, match="privtune ledger budget"):
        plan_round(config, 0.05, 5000, ledger)
    assert ledger.records() == []
    assert math.isclose(plan.epsilon_before, 0.0)


def test_fedprox_proximal_gradient_is_added_after_privatisation():
    """Same seed, so the same Poisson batches and the same noise: the first step starts at the anchor
    (no proximal pull), so with SGD the second step differs by exactly -lr * mu * (w1 - w0). A
    gradient hook would be overwritten by Opacus and give no difference at all."""
    torch.manual_seed(0)
    base = adapter_model("llama", "lora")
    data, lr, mu = examples(6), 0.5, 0.3

    def trained(steps: int, proximal_mu: float) -> dict[str, torch.Tensor]:
        model = copy.deepcopy(base)
        params = [p for p in model.parameters() if p.requires_grad]
        train_round(
            model,
            torch.optim.SGD(params, lr=lr),
            data,
            sample_rate=1.0,
            batch_size=len(data),
            steps=steps,
            config=DpSgdConfig(noise_multiplier=1.0, max_grad_norm=0.05),
            seed=3,
            proximal_mu=proximal_mu,
        )
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    start = {n: p.detach().clone() for n, p in base.named_parameters() if p.requires_grad}
    first, plain, proximal = trained(1, 0.0), trained(2, 0.0), trained(2, mu)
    assert any(not torch.equal(first[n], start[n]) for n in start)
    for name in start:
        torch.testing.assert_close(
            proximal[name] - plain[name], -lr * mu * (first[name] - start[name]), rtol=1e-4, atol=1e-7
        )


# ---------------------------------------------------------------- record-level DP
def records(lengths, seed=0):
    """Token id lists of the given lengths (a record of 40 tokens spans more than three 12-token blocks)."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 259, (n,), generator=generator).tolist() for n in lengths]


def test_record_rows_hold_each_records_first_tokens_then_padding():
    rows = record_examples([[5, 6, 7, 8, 9], [4], [1, 2]], max_tokens=4)
    assert rows.tolist() == [[5, 6, 7, 8], [1, 2, PAD, PAD]]  # truncated to the cap; a 1-token record dropped
    with pytest.raises(PrivtuneError, match="two or more tokens"):
        record_examples([[3]], max_tokens=4)


@pytest.mark.parametrize("family", ["gpt2", "llama", "opt"])
def test_padding_adds_nothing_to_a_records_loss_or_gradient(family):
    model = adapter_model(family, "lora")
    (tokens,) = records([9])
    padded = torch.tensor([tokens + [PAD] * 7])
    losses, grads = [], []
    for ids in (torch.tensor([tokens]), padded):
        model.zero_grad()
        loss = lm_per_sample_loss(model, ids)
        loss.sum().backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for padded_grad, plain_grad in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(padded_grad, plain_grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("family", ["gpt2", "llama", "opt"])
def test_a_record_of_several_blocks_gives_one_clipped_gradient(family):
    """q = 1, negligible noise: the update is -lr * mean over records of clip(gradient of the record's
    mean token loss), each computed on the record alone, unpadded; records of 40 tokens span several
    12-token blocks and still count once."""
    model = adapter_model(family, "lora")
    reference = copy.deepcopy(model)
    token_lists, clip, lr = records([40, 7, 23, 12]), 0.05, 1.0
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in trainable.items()}
    expected = {n: torch.zeros_like(p) for n, p in trainable.items()}
    for tokens in token_lists:
        reference.zero_grad()
        per_example_loss(reference, torch.tensor([tokens])).backward()
        grads = {n: p.grad.detach().clone() for n, p in reference.named_parameters() if p.requires_grad}
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values()))
        factor = min(1.0, clip / (float(norm) + 1e-6))
        assert factor < 1.0, "test design: clipping must be active"
        for n in expected:
            expected[n] -= lr * factor * grads[n] / len(token_lists)
    result = train_round(
        model,
        torch.optim.SGD(list(trainable.values()), lr=lr),
        record_examples(token_lists, max_tokens=64),
        sample_rate=1.0,
        batch_size=len(token_lists),
        steps=1,
        config=DpSgdConfig(noise_multiplier=1e-12, max_grad_norm=clip),
        seed=0,
        unit=record_unit("documents", 64),
    )
    assert result.plan.sample_rate == 1.0
    for name, p in trainable.items():
        torch.testing.assert_close(p.detach() - before[name], expected[name], rtol=1e-4, atol=1e-7)


def test_the_accountant_samples_records_and_the_ledger_names_the_unit(tmp_path):
    ledger = Ledger(tmp_path / "carol.db", owner="carol")
    rows = record_examples(records([30, 5, 18, 9, 44, 12, 7, 25, 16, 11]), max_tokens=32)
    model = adapter_model("llama", "lora")
    unit = record_unit("paragraphs", 32)
    result = train_round(
        model,
        torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1),
        rows,
        sample_rate=0.3,
        batch_size=3,
        steps=4,
        config=DpSgdConfig(noise_multiplier=1.0),
        ledger=ledger,
        seed=2,
        unit=unit,
    )
    assert result.plan.sample_rate == 0.3  # the public rate given, whatever the number of records
    assert result.epsilon == pytest.approx(epsilon_for([(1.0, 0.3, 4)], 1e-5))
    (record,) = ledger.records("dpsgd")
    assert record.details["unit"] == "record" and record.details["sample_rate"] == 0.3
    (guarantee,) = [g for g in ledger.report()["guarantees"] if g["kind"] == "dpsgd"]
    assert guarantee["unit"] == "record"
    assert "for each record of this owner's data" in guarantee["statement"]
    assert "at most the first 32 tokens of a record" in guarantee["statement"]
    assert "a whole document of k paragraphs gets only group privacy" in guarantee["statement"]


def test_a_ledger_never_composes_rounds_of_different_units(tmp_path):
    ledger = Ledger(tmp_path / "dave.db", owner="dave")
    model = adapter_model("gpt2", "lora")
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    config = DpSgdConfig(noise_multiplier=1.0)
    train_round(model, optimizer, examples(8), sample_rate=0.25, batch_size=2, steps=1, config=config, ledger=ledger)
    (guarantee,) = [g for g in ledger.report()["guarantees"] if g["kind"] == "dpsgd"]
    assert guarantee["unit"] == block_unit(12).name and "only group privacy" in guarantee["statement"]
    rows = record_examples(records([20] * 8), max_tokens=16)
    with pytest.raises(PrivtuneError, match="do not compose"):
        train_round(
            model,
            optimizer,
            rows,
            sample_rate=0.25,
            batch_size=2,
            steps=1,
            config=config,
            ledger=ledger,
            unit=record_unit("documents", 16),
        )
    assert len(ledger.records("dpsgd")) == 1


def test_rows_padded_on_the_left_or_too_short_are_refused():
    model = adapter_model("gpt2", "lora")
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    config = DpSgdConfig(noise_multiplier=1.0)
    for rows in (torch.tensor([[PAD, 5, 6], [4, 5, 6]]), torch.tensor([[7, PAD, PAD], [4, 5, 6]])):
        with pytest.raises(PrivtuneError, match="padded on the right"):
            train_round(model, optimizer, rows, sample_rate=0.5, batch_size=1, steps=1, config=config)
    with pytest.raises(PrivtuneError, match="pass their unit"):  # records are never labelled as blocks
        train_round(
            model,
            optimizer,
            torch.tensor([[7, 8, PAD], [4, 5, 6]]),
            sample_rate=0.5,
            batch_size=1,
            steps=1,
            config=config,
        )


def test_a_batch_computed_in_pieces_takes_the_same_step():
    """Seven records in pieces of at most two: every record clipped once, noise added once (same seed,
    same noise), so the update equals the one-piece step."""
    base = adapter_model("llama", "lora")
    rows = record_examples(records([30, 5, 18, 9, 44, 12, 7], seed=4), max_tokens=48)

    def update(pieces: int) -> dict[str, torch.Tensor]:
        model = copy.deepcopy(base)
        params = [p for p in model.parameters() if p.requires_grad]
        before = [p.detach().clone() for p in params]
        result = train_round(
            model,
            torch.optim.SGD(params, lr=1.0),
            rows,
            sample_rate=1.0,
            batch_size=len(rows),
            steps=1,
            config=DpSgdConfig(noise_multiplier=0.5, max_grad_norm=0.05),
            seed=5,
            unit=record_unit("documents", 48),
            max_physical_batch=pieces,
        )
        assert len(result.losses) == 1
        return {i: p.detach() - b for i, (p, b) in enumerate(zip(params, before, strict=True))}

    whole, pieces = update(0), update(2)
    assert any(float(d.abs().max()) > 0 for d in whole.values())
    for i in whole:
        torch.testing.assert_close(pieces[i], whole[i], rtol=1e-4, atol=1e-7)


def test_the_accountants_inputs_do_not_depend_on_the_number_of_records(tmp_path):
    """Neighbouring datasets (one record removed) get the same q, steps and noise: all public configuration."""
    data = record_examples(records([30, 5, 18, 9, 44, 12, 7, 25, 16, 11]), max_tokens=32)
    config = DpSgdConfig(target_epsilon=3.0, total_steps=6)
    details = []
    for name, rows in (("full", data), ("neighbour", data[1:])):
        ledger = Ledger(tmp_path / f"{name}.db", owner=name)
        model = adapter_model("llama", "lora")
        result = train_round(
            model,
            torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1),
            rows,
            sample_rate=0.2,
            batch_size=2,
            steps=3,
            config=config,
            ledger=ledger,
            unit=record_unit("documents", 32),
        )
        (record,) = ledger.records("dpsgd")
        details.append(
            (
                result.plan.step,
                result.epsilon,
                {k: record.details[k] for k in ("noise_multiplier", "sample_rate", "steps", "sampling")},
            )
        )
    assert details[0] == details[1]
    assert details[0][0][1:] == (0.2, 3)
