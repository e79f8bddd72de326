"""Loss on the response tokens only: every loss privtune trains or scores with equals the cross-entropy
computed by hand over the labelled positions, in plain training (full and chunked head), DP-SGD's
per-record loss and gradient, and evaluation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from privtune.common.dpsgd import DpSgdConfig, lm_per_sample_loss, record_unit, train_round
from privtune.common.errors import PrivtuneError
from privtune.common.instructions import Turn, conversation_tokens
from privtune.common.models import tiny_model
from privtune.common.offsite.evaluate import perplexity
from privtune.common.offsite.lm import lean_lm_loss, lm_loss
from privtune.common.packing import record_rows
from privtune.common.text_tokenizer import ByteTokenizer
from privtune.common.tokens import IGNORE, PAD, TokenRows


@pytest.fixture
def model():
    torch.manual_seed(0)
    return tiny_model("llama")


def masked_rows() -> TokenRows:
    """Two rows whose first tokens (a prompt) are not targets; the second row ends in padding."""
    ids = torch.randint(3, 259, (2, 24), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :9] = IGNORE
    labels[1, :5] = IGNORE
    ids[1, 20:] = PAD
    labels[1, 20:] = IGNORE
    return TokenRows(ids, labels)


def manual_per_row(model, rows: TokenRows) -> list[torch.Tensor]:
    """Each row's mean cross-entropy over its targets, from the model's full logits."""
    logits = model(input_ids=rows.ids.clamp(min=0)).logits.float()
    means = []
    for row in range(len(rows)):
        targets = [t for t in range(1, rows.shape[1]) if rows.labels[row, t] != IGNORE]
        nll = [F.cross_entropy(logits[row, t - 1], rows.ids[row, t]) for t in targets]
        means.append(torch.stack(nll).mean())
    return means


def manual_token_mean(model, rows: TokenRows) -> torch.Tensor:
    logits = model(input_ids=rows.ids.clamp(min=0)).logits.float()
    nll = [
        F.cross_entropy(logits[row, t - 1], rows.ids[row, t])
        for row in range(len(rows))
        for t in range(1, rows.shape[1])
        if rows.labels[row, t] != IGNORE
    ]
    return torch.stack(nll).mean()


def test_training_losses_count_the_response_tokens_only(model):
    rows = masked_rows()
    unpadded = rows[:, :20]  # plain training never sees padding
    expected = manual_token_mean(model, unpadded)
    plain = lm_loss(model, unpadded.ids, labels=unpadded.labels)
    lean = lean_lm_loss(model, unpadded.ids, chunk=7, labels=unpadded.labels)
    assert plain.item() == pytest.approx(expected.item(), rel=1e-5)
    assert lean.item() == pytest.approx(expected.item(), rel=1e-5)
    grads = []
    for loss in (plain, lean):
        model.zero_grad()
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    all_counted = lm_loss(model, unpadded.ids)
    assert all_counted.item() != pytest.approx(plain.item(), rel=1e-3)  # the mask changes what is trained


def test_a_batch_without_targets_trains_nothing_but_still_steps(model):
    ids = torch.randint(3, 259, (2, 12), generator=torch.Generator().manual_seed(2))
    for loss_of in (lm_loss, lean_lm_loss):
        loss = loss_of(model, ids, labels=torch.full_like(ids, IGNORE))
        model.zero_grad()
        loss.backward()
        assert loss.item() == 0.0
        assert all(float(p.grad.abs().sum()) == 0.0 for p in model.parameters() if p.grad is not None)


def test_dpsgd_per_record_loss_is_each_records_own_response_loss(model):
    rows = masked_rows()
    per_record = lm_per_sample_loss(model, rows.ids, rows.labels)
    for got, expected in zip(per_record, manual_per_row(model, rows), strict=True):
        assert got.item() == pytest.approx(expected.item(), rel=1e-5)


def test_a_dpsgd_step_is_the_mean_of_each_records_response_gradient(model):
    """With every record sampled (q = 1), no clipping and negligible noise, one SGD step of lr 1 moves the
    weights by minus the mean of the records' own response-only gradients: the labels reach Opacus'
    per-record gradients and one row is one conversation."""
    tok = ByteTokenizer()
    chats = [(Turn("user", f"question {i}?"), Turn("assistant", "answer " * (i + 1))) for i in range(3)]
    rows = record_rows([conversation_tokens(turns, tok) for turns in chats], max_tokens=64)
    model.requires_grad_(False)
    trainable = list(model.model.layers[-1].mlp.parameters())
    for p in trainable:
        p.requires_grad_(True)
    start = [p.detach().clone() for p in trainable]
    grads = torch.autograd.grad(torch.stack(manual_per_row(model, rows)).mean(), trainable)
    train_round(
        model,
        torch.optim.SGD(trainable, lr=1.0),
        rows.ids,
        labels=rows.labels,
        sample_rate=1.0,
        batch_size=len(rows),
        steps=1,
        config=DpSgdConfig(noise_multiplier=1e-12, max_grad_norm=1e4),
        unit=record_unit("documents", 64),
        seed=0,
    )
    for p, p0, g in zip(trainable, start, grads, strict=True):
        torch.testing.assert_close(p0 - p.detach(), g, rtol=1e-4, atol=1e-6)


def test_dpsgd_refuses_labels_that_are_not_the_rows_tokens(model):
    rows = masked_rows()
    model.requires_grad_(False)
    trainable = list(model.model.layers[-1].mlp.parameters())
    for p in trainable:
        p.requires_grad_(True)
    wrong = rows.labels.clone()
    wrong[0, 12] = 7 if int(rows.ids[0, 12]) != 7 else 8
    for labels, message in ((wrong, "its token's id or IGNORE"), (rows.labels[:, :5], "must have the examples' shape")):
        with pytest.raises(PrivtuneError, match=message):
            train_round(
                model,
                torch.optim.SGD(trainable, lr=1.0),
                rows.ids,
                labels=labels,
                sample_rate=0.5,
                batch_size=1,
                steps=1,
                config=DpSgdConfig(noise_multiplier=1.0),
                unit=record_unit("documents", 24),
            )


def test_perplexity_is_over_the_response_tokens(model):
    rows = masked_rows()[:, :20]
    assert perplexity(model, rows, batch_size=1) == pytest.approx(
        math.exp(manual_token_mean(model, rows).item()), rel=1e-5
    )
    with pytest.raises(PrivtuneError, match="no target token"):
        perplexity(model, TokenRows(rows.ids, torch.full_like(rows.ids, IGNORE)))
