"""The run report: the perplexity table carries the public model, the non-private reference and the run's own
private path, each labelled with what it is; guarantees and plots follow."""

from __future__ import annotations

import json
from pathlib import Path

from privtune.report import REFERENCE_LABEL, markdown_run_section, privacy_label, write_markdown_report


def run_folder(root: Path, name: str, config: dict, plugin: float, guarantees: list[dict] | None = None) -> Path:
    out = root / name
    (out / "server" / "plots").mkdir(parents=True)
    metrics = {"config": config, "zero_shot_ppl": 40.0, "emulator_ppl": 41.5, "emulator_adapter_ppl": 30.25}
    (out / "metrics.json").write_text(json.dumps({**metrics, "plugin_ppl": plugin}))
    privacy = {"owner-0": {"guarantees": guarantees or []}}
    (out / "privacy.json").write_text(json.dumps(privacy))
    return out


def table(lines: list[str]) -> dict[str, str]:
    rows = [line.split(" | ") for line in lines if line.startswith("| ") and line.count(" | ") == 1]
    return {label.removeprefix("| "): value.removesuffix(" |") for label, value in rows}


def test_the_table_puts_the_non_private_reference_beside_the_private_plug_in(tmp_path):
    config = {"model": "m", "encoding": "ult", "num-server-rounds": 3, "ldp-epsilon": 8.0, "dp-epsilon": 0.0}
    private = run_folder(tmp_path, "ult", config, plugin=33.5)
    reference = run_folder(tmp_path, "ult-reference", {**config, "ldp-epsilon": 0.0}, plugin=28.75)
    lines = markdown_run_section("ULT", private, tmp_path, reference, (("PMixED service", "not measured: budget"),))
    rows = table(lines)
    assert rows["public model (zero-shot)"] == "40.00"
    assert rows[REFERENCE_LABEL] == "28.75"
    assert rows["full model + aggregated adapter (plug-in), LDP epsilon 8 per token"] == "33.50"
    assert rows["PMixED service"] == "not measured: budget"
    labels = list(rows)
    assert labels.index("public model (zero-shot)") < labels.index(REFERENCE_LABEL) < len(labels) - 2


def test_without_a_reference_the_table_has_no_reference_row(tmp_path):
    config = {"dp-epsilon": 8.0, "dp-delta": 1e-5, "dp-unit": "record"}
    lines = markdown_run_section("run", run_folder(tmp_path, "run", config, plugin=90.0), tmp_path)
    rows = table(lines)
    assert REFERENCE_LABEL not in rows
    assert rows["full model + aggregated adapter (plug-in), DP-SGD (8, 1e-05) per record"] == "90.00"


def test_the_private_path_is_named_from_the_run_config():
    assert privacy_label({}) == "no privacy"
    assert privacy_label({"ldp-epsilon": 4, "dp-epsilon": 2, "dp-delta": 1e-6, "dp-unit": "block"}) == (
        "LDP epsilon 4 per token + DP-SGD (2, 1e-06) per block"
    )


def test_a_missing_figure_says_so_and_guarantees_and_plots_follow(tmp_path):
    guarantee = {"title": "DP-SGD", "unit": "record", "scope": "training data", "statement": "(8, 1e-5)-DP"}
    out = run_folder(tmp_path, "smollm2", {"dp-epsilon": 8.0}, plugin=None, guarantees=[guarantee])
    (out / "server" / "plots" / "loss.png").write_bytes(b"png")
    report = write_markdown_report(tmp_path / "report", "demo", [markdown_run_section("S", out, tmp_path / "report")])
    text = report.read_text()
    assert "| full model + aggregated adapter (plug-in), DP-SGD (8, 1e-05) per record | not measured |" in text
    assert "| owner-0 | DP-SGD | record | training data | (8, 1e-5)-DP |" in text
    assert "![loss](smollm2-loss.png)" in text and (tmp_path / "report" / "smollm2-loss.png").read_bytes() == b"png"


def test_a_reference_worse_than_the_public_model_says_so(tmp_path):
    private = run_folder(tmp_path, "smollm2", {"dp-epsilon": 8.0}, plugin=39.5)
    reference = run_folder(tmp_path, "smollm2-reference", {}, plugin=45.0)
    shown = table(markdown_run_section("S", private, tmp_path, reference))[REFERENCE_LABEL]
    assert shown.startswith("45.00 (above the public model's")
