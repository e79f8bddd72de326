"""Run every attack on every target of a finished run and hold each result against its DP limit."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from privtune.audit import attacks, stats
from privtune.audit.secrets import SECRETS_FILE, AuditSecrets
from privtune.audit.targets import Claim, RunView, Target, load_targets, record_group, run_tokenizer
from privtune.common.errors import PrivtuneError

FPRS = (0.01, 0.001)


@dataclass
class AuditResult:
    owner: str
    members: int
    non_members: int
    auc: dict[str, dict[str, dict[str, float]]] = field(default_factory=lambda: defaultdict(dict))
    tpr_at_1pct_fpr: dict[str, dict[str, dict[str, float]]] = field(default_factory=lambda: defaultdict(dict))
    tpr_at_01pct_fpr: dict[str, dict[str, dict[str, float]]] = field(default_factory=lambda: defaultdict(dict))
    exposure: dict[str, dict[str, float]] = field(default_factory=lambda: defaultdict(dict))
    bounds: dict[str, dict[str, Any]] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    roc: dict[str, dict[str, list[list[float]]]] = field(default_factory=lambda: defaultdict(dict))
    queries_spent: int = 0
    service_records: int = 0  # member records (and as many non-members) the service attack asked about

    def to_json(self) -> dict[str, Any]:
        return {
            "owner": self.owner,
            "members": self.members,
            "non_members": self.non_members,
            "auc": dict(self.auc),
            "tpr_at_1pct_fpr": dict(self.tpr_at_1pct_fpr),
            "tpr_at_0.1pct_fpr": dict(self.tpr_at_01pct_fpr),
            "exposure": dict(self.exposure),
            "bounds": self.bounds,
            "violations": self.violations,
            "queries_spent": self.queries_spent,
            "service_records": self.service_records,
        }


def find_secrets(view: RunView, secrets_file: Path | None) -> AuditSecrets:
    path = secrets_file or view.server_dir.parent / SECRETS_FILE
    if not path.exists():
        raise PrivtuneError(
            f"no audit secrets at {path}: the audit needs to know which records were trained on and which canaries "
            "were planted. Make the run with 'privtune simulate --canaries K ...' (or give --secrets FILE)"
        )
    return AuditSecrets.load(path)


def judge(
    result: AuditResult, target: str, attack: str, members: np.ndarray, non_members: np.ndarray, claim: Claim | None
) -> None:
    auc = stats.bootstrap(stats.roc_auc, members, non_members)
    result.auc[target][attack] = auc.to_json()
    tprs = [stats.bootstrap(lambda m, n, f=f: stats.tpr_at_fpr(m, n, f), members, non_members) for f in FPRS]
    result.tpr_at_1pct_fpr[target][attack] = tprs[0].to_json()
    result.tpr_at_01pct_fpr[target][attack] = tprs[1].to_json()
    fpr, tpr = stats.roc_curve(members, non_members)
    result.roc[target][attack] = [fpr.tolist(), tpr.tolist()]
    if claim is None:
        return
    auc_limit = stats.dp_auc_bound(claim.epsilon, claim.delta)
    if auc.floor > auc_limit:
        result.violations.append(
            f"{target}/{attack}: AUC {auc.value:.3f} (99.5% lower bound {auc.floor:.3f}) > {auc_limit:.3f}"
        )
    for f, interval in zip(FPRS, tprs):
        limit = float(stats.dp_tpr_bound(f, claim.epsilon, claim.delta))
        if f * len(non_members) >= 1 and interval.floor > limit:
            result.violations.append(
                f"{target}/{attack}: TPR {interval.value:.3f} at FPR {f:g} "
                f"(99.5% lower bound {interval.floor:.3f}) > {limit:.3f}"
            )


def audit_run(
    run: Path,
    owner: str | None = None,
    canaries: int | None = None,
    key_file: Path | None = None,
    secrets_file: Path | None = None,
) -> AuditResult:
    """Every attack against the public model, the plugged-in model and the owner's adapter."""
    view = RunView.open(run)
    planted = find_secrets(view, secrets_file)
    owner = owner or planted.owner
    if owner != planted.owner:
        raise PrivtuneError(f"the audit secrets belong to {planted.owner}, not {owner}")
    members, non_members = planted.members, planted.non_members
    result = AuditResult(owner, len(members), len(non_members))
    unit = next(
        (g.get("unit", "") for g in view.privacy.get(owner, {}).get("guarantees", []) if g.get("kind") == "dpsgd"), ""
    )
    group = record_group(run_tokenizer(view, key_file)[0], members, int(view.config["block-size"]), unit)
    public_scores: dict[str, np.ndarray] = {}
    exposures: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for target in load_targets(view, owner, key_file, group):
        scores = _attack_scores(target, members, non_members)
        if target.name == "public":
            public_scores = scores
        else:
            scores["reference"] = scores["loss"] - public_scores["loss"]
        split = len(members)
        for attack, values in scores.items():
            judge(result, target.name, attack, values[:split], values[split:], target.claim)
        result.bounds[target.name] = _bound(target.claim)
        for canary in planted.canaries[:canaries]:
            exposures[target.name][str(canary.repeats)].append(attacks.exposure(target.sequence_logprobs, canary))
    result.exposure = {t: {r: float(np.mean(v)) for r, v in by.items()} for t, by in exposures.items()}
    return result


def _attack_scores(target: Target, members: list[str], non_members: list[str]) -> dict[str, np.ndarray]:
    logprobs = target.sequence_logprobs(members + non_members)
    return {"loss": attacks.loss_scores(logprobs), "min_k": attacks.min_k_scores(logprobs)}


def _bound(claim: Claim | None) -> dict[str, Any]:
    if claim is None:
        return {"claim": None}
    return {
        "epsilon": claim.epsilon,
        "delta": claim.delta,
        "basis": claim.basis,
        "auc_bound": stats.dp_auc_bound(claim.epsilon, claim.delta),
        "tpr_bound_at_1pct_fpr": float(stats.dp_tpr_bound(0.01, claim.epsilon, claim.delta)),
    }


def audit_service(
    result: AuditResult,
    run: Path,
    address: str,
    key_file: Path | None = None,
    secrets_file: Path | None = None,
    tls_ca: bytes | None = None,
) -> None:
    """Add the PMixED service, attacked through its API, to ``result`` (spending its budget)."""
    from privtune.audit.service import plan_records, service_claim, service_scores
    from privtune.client.query import InferenceClient

    view = RunView.open(run)
    planted = find_secrets(view, secrets_file)
    tokenizer = run_tokenizer(view, key_file)[0]
    with InferenceClient(address, tls_ca=tls_ca) as client:
        status = client.budget_status()
        members, non_members = plan_records(
            planted.members, planted.non_members, int(status["queries_total"]) - int(status["queries_spent"])
        )
        scores, spent = service_scores(client, tokenizer, members + non_members)
    result.queries_spent += spent
    result.service_records = len(members)
    claim = service_claim(status)
    judge(result, "pmixed-service", "next_token_match", scores[: len(members)], scores[len(members) :], claim)
    result.bounds["pmixed-service"] = _bound(claim)
