"""What the guarantees buy: the same federation audited without privacy, with LDP, with DP-SGD and
through the PMixED service.

Each configuration trains a federation on SmolLM2 in which the harness planted canaries (1, 4 and
16 copies) in owner-0's text and kept half of its records back; ``privtune audit`` then attacks the
public, plugged-in and adapter models (loss, Min-K% Prob, reference attacks; canary exposure). The
PMixED configuration serves the non-private run's members and attacks the service through its API.
The non-private run must show leakage, or the audit has no power; every private run must stay
under its theory line.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path
from typing import Any

from bench.harness import print_table, write_results
from privtune.audit.harness import plant_secrets
from privtune.audit.measure import AuditResult, audit_run
from privtune.audit.report import write_report
from privtune.common.federation.config import FederationConfig
from privtune.common.paths import cache_dir
from privtune.simulate import simulate

CONFIGS: dict[str, dict[str, Any]] = {
    "non-private": {},
    "ldp": {"ldp-epsilon": 8.0},
    "dp-sgd": {"dp-epsilon": 8.0},
}


def federation(name: str, args: argparse.Namespace, root: Path) -> tuple[Path, float]:
    out = root / name
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
            **CONFIGS[name],
        }
    )
    start = time.perf_counter()
    simulate(cfg, args.owners, out, plant_secrets(cfg, args.owners, out, args.canaries))
    return out, time.perf_counter() - start


def summary_rows(name: str, result: AuditResult) -> list[list[Any]]:
    rows = []
    for target, by_attack in result.auc.items():
        bound = result.bounds.get(target, {})
        for attack, auc in by_attack.items():
            exposure = result.exposure.get(target, {})
            rows.append(
                [
                    name,
                    target,
                    attack,
                    auc["value"],
                    result.tpr_at_1pct_fpr[target][attack]["value"],
                    bound.get("auc_bound", "-"),
                    exposure.get("16", "-"),
                ]
            )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--owners", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=40)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--max-train-blocks", type=int, default=1024)
    parser.add_argument("--canaries", type=int, default=3)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    args = parser.parse_args()
    root = cache_dir("bench-audit")
    figures: dict[str, Any] = {
        "settings": vars(args),
        "auc": {},
        "tpr_at_1pct_fpr": {},
        "exposure": {},
        "bounds": {},
        "violations": {},
        "seconds": {},
    }
    rows = []
    for name in args.configs:
        out, seconds = federation(name, args, root)
        result = audit_run(out)
        write_report(result, Path(__file__).resolve().parent / "results" / "audit" / name)
        figures["auc"][name] = result.auc
        figures["tpr_at_1pct_fpr"][name] = result.tpr_at_1pct_fpr
        figures["exposure"][name] = result.exposure
        figures["bounds"][name] = result.bounds
        figures["violations"][name] = result.violations
        figures["seconds"][name] = seconds
        rows += summary_rows(name, result)
    print_table(
        f"membership inference and canaries on {args.model} ({args.owners} owners, {args.rounds} rounds)",
        ["config", "target", "attack", "AUC", "TPR@1%FPR", "AUC limit", "exposure 16x"],
        rows,
    )
    write_results("audit", figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
