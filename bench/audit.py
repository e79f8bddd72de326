"""What the guarantees buy: the same federation audited without privacy, with LDP, with DP-SGD and
through the PMixED service.

Each federation trains on SmolLM2 with canaries (1, 4 and 16 copies) planted in owner-0's text and
half of its records kept back; ``privtune audit`` then attacks the public, plugged-in and adapter
models (loss, Min-K% Prob, reference attacks; canary exposure). The PMixED configuration serves the
non-private run's member adapters through ``privtune serve`` and attacks the service through its
API alone, spending its budget. The non-private run must show leakage, or the audit has no power;
every private run must stay under its theory line.

Configurations run one per invocation if need be: each one's figures are merged into
``bench/results/audit.json`` beside the others', and ``bench/results/audit/roc.png`` is drawn from
every configuration audited so far.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.harness import RESULTS_DIR, print_table, write_results
from privtune.audit import stats
from privtune.audit.harness import plant_secrets
from privtune.audit.measure import AuditResult, audit_run, audit_service
from privtune.audit.report import write_report
from privtune.audit.secrets import SECRETS_FILE, AuditSecrets
from privtune.audit.service import POSITIONS
from privtune.common.errors import PrivtuneError
from privtune.common.federation.config import FederationConfig
from privtune.common.paths import cache_dir
from privtune.simulate import simulate

FEDERATIONS: dict[str, dict[str, Any]] = {
    "non-private": {},
    "ldp": {"ldp-epsilon": 8.0},
    "dp-sgd": {"dp-epsilon": 8.0},
}
PMIXED = "pmixed"
SERVED_RUN = "non-private"
CONFIGS = [*FEDERATIONS, PMIXED]
AUDIT_DIR = RESULTS_DIR / "audit"
CURVES_FILE = "curves.json"
FIGURES = ("auc", "tpr_at_1pct_fpr", "exposure", "bounds", "violations", "seconds", "queries_spent", "settings")


@dataclass(frozen=True)
class ServiceSettings:
    """The PMixED deployment attacked: epsilon 8 over exactly the queries the attack spends, with the service's
    default projection and member sampling rate (``q`` None), as the demo serves."""

    epsilon: float = 8.0
    delta: float = 1e-5
    q: float | None = None
    records: int = 142  # member and as many non-member records; POSITIONS queries each


def federation(name: str, args: argparse.Namespace, root: Path) -> tuple[Path, float | None]:
    """The configuration's finished run folder and its training seconds: trained here, or (``--reuse``)
    the one trained before (seconds None: the figure of the run that trained it stands)."""
    out = root / name
    if args.reuse and (out / "server" / "metrics.json").exists():
        check_settings(out, args)
        return out, None
    shutil.rmtree(out, ignore_errors=True)
    cfg = FederationConfig.from_run_config(
        {
            "model": args.model,
            "num-server-rounds": args.rounds,
            "local-steps": args.local_steps,
            "k-bottom": 2,
            "k-top": 2,
            "n-emulator": 8,
            "learning-rate": args.learning_rate,
            "max-train-blocks": args.max_train_blocks,
            "run-dir": str(out / "server"),
            "min-train-nodes": 2,
            **FEDERATIONS[name],
        }
    )
    start = time.perf_counter()
    simulate(cfg, args.owners, out, plant_secrets(cfg, args.owners, out, args.canaries))
    return out, time.perf_counter() - start


def check_settings(out: Path, args: argparse.Namespace) -> None:
    """A reused run must have been trained with the settings of this invocation, or the
    configurations would not be comparable."""
    config = json.loads((out / "server" / "metrics.json").read_text())["config"]
    wanted = {
        "model": args.model,
        "num-server-rounds": args.rounds,
        "local-steps": args.local_steps,
        "learning-rate": args.learning_rate,
        "max-train-blocks": args.max_train_blocks,
    }
    differing = {k: (config.get(k), v) for k, v in wanted.items() if config.get(k) != v}
    if differing:
        raise PrivtuneError(
            f"{out} was trained with other settings (run, asked): {differing}; drop --reuse to train it again"
        )


def attack_service(run: Path, settings: ServiceSettings, root: Path) -> AuditResult:
    """A fresh PMixED deployment of the run's members, attacked through its API.

    Fresh means its own ledger and ledger registry: the attack gets the whole budget of one
    deployment, and the claim it is held against is that deployment's (epsilon, delta).
    """
    from privtune.server.inference import cli as serve_cli

    folder = root / PMIXED
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    planted = AuditSecrets.load(run / SECRETS_FILE)
    config = serve_cli.ServeConfig(
        run=str(run),
        epsilon=settings.epsilon,
        delta=settings.delta,
        queries=2 * POSITIONS * min(settings.records, len(planted.members), len(planted.non_members)),
        q=settings.q,
        ledger=str(folder / "pmixed-ledger.sqlite"),
        registry=str(folder / "bindings.json"),
        num_cpus=2,
        port=0,
    )
    result = AuditResult(planted.owner, len(planted.members), len(planted.non_members))
    running = serve_cli.start(config)
    try:
        audit_service(result, run, f"127.0.0.1:{running.port}")
    finally:
        running.stop()
    return result


def best_curves(result: AuditResult) -> dict[str, dict[str, Any]]:
    """Per target, the ROC curve of its strongest attack (by AUC), with the target's bound."""
    curves = {}
    for target, by_attack in result.auc.items():
        attack = max(by_attack, key=lambda a: by_attack[a]["value"])
        fpr, tpr = result.roc[target][attack]
        curves[target] = {
            "attack": attack,
            "auc": by_attack[attack]["value"],
            "fpr": fpr,
            "tpr": tpr,
            "bound": result.bounds.get(target, {}),
        }
    return curves


def merged_figures(path: Path, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The figures already in ``path`` with this invocation's configurations replaced."""
    old = json.loads(path.read_text()) if path.exists() else {}
    figures: dict[str, Any] = {key: dict(old.get(key, {})) for key in FIGURES}
    if "configs" in figures["settings"]:  # one invocation's settings: give each of its configurations a copy
        flat = figures["settings"]
        figures["settings"] = {name: {**flat, "configs": [name]} for name in flat["configs"]}
    for name, by_figure in results.items():
        for key, value in by_figure.items():
            figures[key][name] = value
    return figures


def plot_all(path: Path) -> None:
    """Every audited configuration's strongest attack per target in one ROC plot, with the theory
    line of each configuration that claims a guarantee."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 6))
    grid = np.linspace(0, 1, 2001)
    for name in CONFIGS:
        curves_path = path.parent / name / CURVES_FILE
        if not curves_path.exists():
            continue
        lines = ax.plot([], [])
        colour = lines[0].get_color()
        bounds = set()
        for target, curve in json.loads(curves_path.read_text()).items():
            if target == "public" and name != SERVED_RUN:
                continue  # one public baseline is enough: it is the same model in every federation
            style = {"adapter": "-", "plugin": "--", "public": ":", "pmixed": "-"}[target.split(":")[0].split("-")[0]]
            ax.plot(
                curve["fpr"],
                curve["tpr"],
                ls=style,
                color=colour,
                lw=1.3,
                label=f"{name}: {target} / {curve['attack']} (AUC {curve['auc']:.2f})",
            )
            bound = curve["bound"]
            if target != "public" and bound.get("epsilon"):
                bounds.add((bound["epsilon"], bound["delta"]))
        for epsilon, delta in sorted(bounds):
            ax.plot(
                grid,
                np.minimum(stats.dp_tpr_bound(grid, epsilon, delta), 1.0),
                ls="-.",
                color=colour,
                lw=0.9,
                alpha=0.7,
                label=f"{name}: theory line ({epsilon:.3g}, {delta:g})",
            )
    ax.plot([0, 1], [0, 1], ls=":", color="black", lw=0.8)
    ax.set(
        xlabel="false positive rate",
        ylabel="true positive rate",
        xlim=(0, 1),
        ylim=(0, 1.01),
        title="membership inference on owner-0: strongest attack per target",
    )
    ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def summary_rows(name: str, result: AuditResult) -> list[list[Any]]:
    rows = []
    for target, by_attack in result.auc.items():
        bound = result.bounds.get(target, {})
        for attack, auc in by_attack.items():
            rows.append(
                [
                    name,
                    target,
                    attack,
                    auc["value"],
                    result.tpr_at_1pct_fpr[target][attack]["value"],
                    bound.get("auc_bound", "-"),
                    result.exposure.get(target, {}).get("16", "-"),
                ]
            )
    return rows


def audit_config(name: str, args: argparse.Namespace, root: Path) -> tuple[AuditResult, float | None]:
    if name == PMIXED:
        run, _ = federation(SERVED_RUN, argparse.Namespace(**{**vars(args), "reuse": True}), root)
        start = time.perf_counter()
        result = attack_service(run, ServiceSettings(records=args.service_records), root)
        return result, time.perf_counter() - start
    run, seconds = federation(name, args, root)
    return audit_run(run), seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--owners", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--local-steps", type=int, default=30)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--max-train-blocks", type=int, default=1024)
    parser.add_argument("--canaries", type=int, default=3)
    parser.add_argument("--configs", nargs="+", default=CONFIGS, choices=CONFIGS)
    parser.add_argument(
        "--reuse", action="store_true", help="audit the run folders trained before (same settings) instead of training"
    )
    parser.add_argument(
        "--service-records",
        type=int,
        default=ServiceSettings.records,
        help=f"member (and non-member) records the PMixED attack asks about, {POSITIONS} queries each",
    )
    args = parser.parse_args()
    root = cache_dir("bench-audit")
    results: dict[str, dict[str, Any]] = {}
    rows = []
    for name in args.configs:
        result, seconds = audit_config(name, args, root)
        out = AUDIT_DIR / name
        write_report(result, out)
        (out / CURVES_FILE).write_text(json.dumps(best_curves(result)) + "\n")
        results[name] = {
            "auc": result.auc,
            "tpr_at_1pct_fpr": result.tpr_at_1pct_fpr,
            "exposure": result.exposure,
            "bounds": result.bounds,
            "violations": result.violations,
            "queries_spent": result.queries_spent,
            "settings": {**vars(args), "configs": [name]},
        }
        if seconds is not None:
            results[name]["seconds"] = seconds
        rows += summary_rows(name, result)
        write_results("audit", merged_figures(RESULTS_DIR / "audit.json", results))
        plot_all(AUDIT_DIR / "roc.png")
    print_table(
        f"membership inference and canaries on {args.model} ({args.owners} owners, {args.rounds} rounds)",
        ["config", "target", "attack", "AUC", "TPR@1%FPR", "AUC limit", "exposure 16x"],
        rows,
    )
    violations = [f"{name}: {v}" for name, figures in results.items() for v in figures["violations"]]
    for violation in violations:
        print(f"GUARANTEE REFUTED: {violation}")
    return 1 if violations else 0


if __name__ == "__main__":
    raise SystemExit(main())
