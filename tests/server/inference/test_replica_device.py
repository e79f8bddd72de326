"""Moving a replica's ensemble to another device or precision moves every weight it holds."""

from __future__ import annotations

import torch

from privtune.common.models import load_model
from privtune.common.pmixed import PMixedBudget
from privtune.common.pmixed.ensemble import Ensemble
from privtune.server.inference.members import from_arguments
from tests.server.inference.running import MODEL, make_adapters


def test_an_ensemble_moved_to_bf16_holds_only_bf16_weights_and_still_releases_tokens(tmp_path):
    served = from_arguments(None, MODEL, make_adapters(tmp_path, n=2))
    ensemble = Ensemble(load_model(MODEL).model, served.load_members())
    session = ensemble.session([1, 5, 9])
    before = session.logits([0, 1])
    ensemble.to(torch.device("cpu"), torch.bfloat16)
    held = [
        *ensemble.base.parameters(),
        *(p for own in ensemble.own_blocks for block in own.values() for p in block.parameters()),
        *(
            t
            for routed in ensemble.routed.values()
            for layer in routed.layers.values()
            for a, b, _ in layer.factors.values()
            for t in (a, b)
        ),
    ]
    assert held and all(t.dtype == torch.bfloat16 for t in held)
    after = ensemble.session([1, 5, 9]).logits([0, 1])  # a missed weight would fail here on mixed dtypes
    assert after.dtype == torch.bfloat16 and torch.isfinite(after).all()
    assert torch.allclose(after.float(), before, atol=0.1, rtol=0.05)
    budget = PMixedBudget(epsilon=8.0, delta=1e-5, alpha=3, T=4, q=0.5, n_members=2)
    assert 0 <= ensemble.session([1, 5, 9]).private_next_token(budget) < before.shape[-1]
