"""The audit folder: ``audit.json`` for tools, ``report.md`` and ``roc.png`` for people."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from privtune.audit import stats
from privtune.audit.measure import AuditResult

HOW_TO_READ = """\
How to read this: every privtune guarantee is an upper bound on what any attacker can learn; this
audit measures what concrete attacks do learn. AUC 0.5 means the attack cannot tell members from
non-members; 1.0 means it always can. TPR at 1% FPR is how many members it finds while wrongly
accusing 1% of non-members. Exposure (bits) says how far a planted secret stands out from random
secrets of the same format; about 1.4 bits is chance, and the most this estimate can show is
log2(sample + 1). For a target with a DP claim, the limit column is the best AUC any attack can
reach under that claim; a measured point whose 99.5% lower bound lies above its limit refutes the claim
and makes `privtune audit` exit with status 1. Attacks below the limit do not prove privacy: they
show only what these attacks find.
"""


def write_report(result: AuditResult, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "audit.json").write_text(json.dumps(result.to_json(), indent=2, sort_keys=True) + "\n")
    _plot(result, out / "roc.png")
    lines = [
        f"# privtune audit of {result.owner}",
        "",
        f"{result.members} member and {result.non_members} non-member records of {result.owner}"
        + (
            f"; the PMixED service was asked about {result.service_records} member and {result.service_records} "
            f"non-member records, spending {result.queries_spent} queries of its budget"
            if result.queries_spent
            else ""
        ),
        "",
        "| target | attack | AUC (95% CI) | TPR at 1% FPR | AUC limit of the claim | claim |",
        "|---|---|---|---|---|---|",
    ]
    for target, by_attack in result.auc.items():
        bound = result.bounds.get(target, {})
        limit = f"{bound['auc_bound']:.3f}" if bound.get("epsilon") is not None else "none claimed"
        for attack, auc in by_attack.items():
            tpr = result.tpr_at_1pct_fpr[target][attack]
            lines.append(
                f"| {target} | {attack} | {auc['value']:.3f} ({auc['low']:.3f}-{auc['high']:.3f}) | "
                f"{tpr['value']:.3f} | {limit} | {bound.get('basis', '-')} |"
            )
    if result.exposure:
        repeats = sorted({r for by in result.exposure.values() for r in by}, key=int)
        lines += ["", "| target | " + " | ".join(f"exposure, {r}x" for r in repeats) + " |"]
        lines.append("|---|" + "---|" * len(repeats))
        for target, by in result.exposure.items():
            lines.append(f"| {target} | " + " | ".join(f"{by.get(r, float('nan')):.2f}" for r in repeats) + " |")
    lines += ["", "![ROC curves](roc.png)", ""]
    lines += ["**Guarantee refuted:** " + v for v in result.violations] or ["No measured point exceeds its claim."]
    lines += ["", HOW_TO_READ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def _plot(result: AuditResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5))
    for target, by_attack in result.roc.items():
        for attack, (fpr, tpr) in by_attack.items():
            ax.plot(fpr, tpr, label=f"{target} / {attack}", lw=1.2)
    for bound in result.bounds.values():
        if bound.get("epsilon") is not None and bound["epsilon"] > 0:
            grid = np.linspace(0, 1, 400)
            ax.plot(grid, stats.dp_tpr_bound(grid, bound["epsilon"], bound["delta"]), ls="--", color="gray")
    ax.plot([0, 1], [0, 1], ls=":", color="black", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"membership inference on {result.owner}")
    ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
