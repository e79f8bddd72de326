"""Outputs of a simulated run gathered in one folder: metrics.json and privacy.json.

In a real deployment every ledger stays at its owner's site; in a simulation all sites share this
machine, so the report can show each owner's ledger next to the model owner's metrics.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from privtune.common.federation.config import FederationConfig


def write_simulation_outputs(cfg: FederationConfig, out: Path, owners: int) -> dict[str, Any]:
    server_dir = Path(cfg.run_dir)
    metrics = json.loads((server_dir / "metrics.json").read_text())
    shutil.copy(server_dir / "metrics.json", out / "metrics.json")
    privacy = {}
    for i in range(owners):
        ledger_path = out / "owners" / f"owner-{i}" / "ledger.sqlite"
        if ledger_path.exists():
            from privtune.common.ledger import Ledger

            privacy[f"owner-{i}"] = Ledger(ledger_path, read_only=True).report()
        else:
            privacy[f"owner-{i}"] = {"releases": []}
    (out / "privacy.json").write_text(json.dumps(privacy, indent=2, sort_keys=True) + "\n")
    return metrics


PERPLEXITIES = (
    ("zero_shot_ppl", "public model (zero-shot)"),
    ("emulator_ppl", "emulator alone"),
    ("emulator_adapter_ppl", "emulator + trained adapter (what data owners see)"),
)
REFERENCE_LABEL = (
    "non-private fine-tuned: plug-in of the same federation with privacy off (same data, rounds and steps; "
    "a reference that no owner would release)"
)


def privacy_label(config: dict[str, Any]) -> str:
    """The private path a run's plug-in took, from its run config."""
    ldp, dp = float(config.get("ldp-epsilon", 0.0)), float(config.get("dp-epsilon", 0.0))
    paths = ([f"LDP epsilon {ldp:g} per token"] if ldp > 0 else []) + (
        [f"DP-SGD ({dp:g}, {float(config.get('dp-delta', 1e-5)):g}) per {config.get('dp-unit', 'record')}"]
        if dp > 0
        else []
    )
    return " + ".join(paths) or "no privacy"


def reference_value(reference: float | None, public: float | None) -> float | str | None:
    """The reference's perplexity, saying so when it is above the public model's.

    Two causes were measured on the demo's SmolLM2 federation: adapters trained against an undistilled, heavily
    thinned emulator do not carry over to the full model, and a few owner blocks are overfitted within a few
    steps (with the emulator kept whole, 64 blocks per owner gave 126.7 against a public 117.0, 512 gave 113.3).
    """
    if reference is None or public is None or reference <= public:
        return reference
    return (
        f"{reference:.2f} (above the public model's: training without privacy did not help here; adapters trained "
        "against an undistilled or heavily thinned emulator do not carry over to the full model, and little owner "
        "text is overfitted in a few steps; see the README's offsite-tuning section)"
    )


def perplexity_rows(
    metrics: dict[str, Any], reference: dict[str, Any] | None = None, extra: tuple[tuple[str, str], ...] = ()
) -> list[str]:
    """Public model, emulator rows, the non-private reference when there is one, the run's own plug-in, then
    ``extra`` rows (label, text) for paths whose perplexity is not a number here."""
    rows: list[tuple[str, Any]] = [(label, metrics.get(key)) for key, label in PERPLEXITIES]
    if reference is not None:
        rows.append((REFERENCE_LABEL, reference_value(reference.get("plugin_ppl"), metrics.get("zero_shot_ppl"))))
    private = privacy_label(metrics.get("config", {}))
    rows += [(f"full model + aggregated adapter (plug-in), {private}", metrics.get("plugin_ppl")), *extra]
    lines = ["| held-out perplexity | value |", "|---|---|"]
    for label, value in rows:
        shown = "not measured" if value is None else value if isinstance(value, str) else f"{value:.2f}"
        lines.append(f"| {label} | {shown} |")
    return lines


def markdown_run_section(
    title: str,
    out: Path,
    report_dir: Path,
    reference: Path | None = None,
    extra_rows: tuple[tuple[str, str], ...] = (),
) -> list[str]:
    """One run of a simulation as report text: perplexities (beside those of its non-private ``reference`` run, when
    given, and ``extra_rows``), each owner's guarantees, its plots."""
    metrics = json.loads((out / "metrics.json").read_text())
    privacy = json.loads((out / "privacy.json").read_text()) if (out / "privacy.json").exists() else {}
    config = metrics.get("config", {})
    lines = [
        f"## {title}",
        "",
        f"Model `{config.get('model')}`, encoding {config.get('encoding')}, "
        f"{config.get('num-server-rounds')} rounds, run folder `{out}`.",
        "",
    ]
    reference_metrics = json.loads((reference / "metrics.json").read_text()) if reference else None
    lines += perplexity_rows(metrics, reference_metrics, extra_rows)
    lines += ["", "| owner | guarantee | unit | scope | what it says |", "|---|---|---|---|---|"]
    for owner, report in sorted(privacy.items()):
        for g in report.get("guarantees", []):
            lines.append(
                f"| {owner} | {g.get('title', g.get('kind'))} | {g.get('unit', '-')} | {g.get('scope', '-')} | "
                f"{g.get('statement', '')} |"
            )
    for plot in sorted((out / "server" / "plots").glob("*.png")):
        report_dir.mkdir(parents=True, exist_ok=True)
        target = report_dir / f"{out.name}-{plot.name}"
        shutil.copy(plot, target)
        lines += ["", f"![{plot.stem}]({target.name})"]
    return lines + [""]


def write_markdown_report(report_dir: Path, title: str, sections: list[list[str]]) -> Path:
    """``report.md`` in ``report_dir`` from sections of lines (plots are copied beside it)."""
    report_dir.mkdir(parents=True, exist_ok=True)
    path = report_dir / "report.md"
    path.write_text("\n".join([f"# {title}", "", *[line for section in sections for line in section]]) + "\n")
    return path
