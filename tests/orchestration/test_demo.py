"""The demo's phase clock, its PMixED row, and its non-private reference: the same federation with privacy off,
scored on the same held-out ids as the private run. Real simulations on tiny models."""

from __future__ import annotations

import json
import re

import pytest
import torch

from privtune.demo import NO_PRIVACY, ULT_SERVING, pmixed_row, reference_federation
from privtune.demo_phases import PhaseClock, format_seconds


def test_each_phase_is_timed_in_order_even_when_it_fails(capsys):
    clock = PhaseClock()
    with clock.phase("first"):
        pass
    with pytest.raises(RuntimeError), clock.phase("second"):
        raise RuntimeError("boom")
    assert [name for name, _ in clock.phases] == ["first", "second"]
    assert all(seconds >= 0 for _, seconds in clock.phases)
    printed = capsys.readouterr().out
    assert re.search(r"\[demo\] first: \d+\.\d s", printed) and "[demo] second:" in printed
    summary = clock.summary().splitlines()
    assert summary[0] == "phase timings (wall):" and summary[-1].split()[0] == "total"
    assert clock.markdown()[-2] == f"| total | {format_seconds(clock.total)} |"


def test_seconds_read_as_minutes_past_one():
    assert format_seconds(4.25) == "4.2 s"
    assert format_seconds(682) == "11 min 22 s"


def test_the_pmixed_row_says_why_it_has_no_perplexity():
    label, why = pmixed_row(ULT_SERVING)
    assert "PMixED" in label and why.startswith("not measured") and f"{ULT_SERVING.queries} queries" in why


@pytest.mark.slow
def test_the_reference_is_the_same_ult_federation_without_privacy_on_the_same_held_out_ids(tmp_path):
    from privtune.common.federation.config import FederationConfig
    from privtune.common.models import LoadedModel, save_model, tiny_model
    from privtune.common.ult import UltConfig, build_table
    from privtune.common.ult.keys import new_key_file
    from privtune.common.ult.tokenizer import UltTokenizer
    from privtune.simulate import federation_key_path, prepare_ult_federation

    model = tmp_path / "ult-model"
    table = build_table(["To be, or not to be, that is the question. " * 400], UltConfig(vocab_size=300))
    save_model(LoadedModel(tiny_model("llama", vocab_size=300), UltTokenizer(table), "tiny-ult"), model)
    settings = {
        "model": str(model),
        "encoding": "ult",
        "ldp-epsilon": 8.0,
        "ldp-embedding": "tiny",
        "local-steps": 2,
        "batch-size": 4,
        "block-size": 32,
        "max-train-blocks": 16,
    }
    private = tmp_path / "demo" / "ult"
    federation_key_path(private).parent.mkdir(parents=True)
    new_key_file(federation_key_path(private))
    nodes = {i: {"workspace": str(private / "owners" / f"owner-{i}")} for i in range(2)}
    private_cfg = FederationConfig.from_run_config({**settings, "run-dir": str(private / "server")})
    private_ids = torch.load(prepare_ult_federation(private_cfg, 2, private, nodes).eval_ids, weights_only=True)

    reference = reference_federation(private, 2, 1, settings)

    assert reference == tmp_path / "demo" / "ult-reference"
    assert federation_key_path(reference).read_bytes() == federation_key_path(private).read_bytes()
    assert torch.equal(torch.load(reference / "federation" / "eval_ids.pt", weights_only=True), private_ids)
    metrics = json.loads((reference / "metrics.json").read_text())
    assert {key: metrics["config"][key] for key in NO_PRIVACY} == NO_PRIVACY
    assert metrics["plugin_ppl"] > 0
    privacy = json.loads((reference / "privacy.json").read_text())
    assert all(not report.get("guarantees") for report in privacy.values())
