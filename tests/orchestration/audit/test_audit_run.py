import json

import numpy as np
import pytest

from privtune.audit.harness import plant_secrets
from privtune.audit.measure import AuditResult, judge
from privtune.audit.secrets import SECRETS_FILE
from privtune.audit.targets import Claim
from privtune.cli import main
from privtune.common.errors import PrivtuneError
from privtune.common.federation.config import FederationConfig


def test_a_separable_attack_refutes_a_tight_claim_and_a_loose_one_stands():
    rng = np.random.default_rng(0)
    members, non_members = rng.normal(3, 1, 200), rng.normal(0, 1, 200)
    tight = AuditResult("owner-0", 200, 200)
    judge(tight, "plugin", "loss", members, non_members, Claim(0.1, 1e-5, "test"))
    assert any("AUC" in v for v in tight.violations) and any("TPR" in v for v in tight.violations)
    loose = AuditResult("owner-0", 200, 200)
    judge(loose, "plugin", "loss", members, non_members, Claim(20.0, 1e-5, "test"))
    assert loose.violations == []
    assert loose.auc["plugin"]["loss"]["value"] > 0.95


@pytest.mark.slow
def test_audit_of_a_real_simulated_run(tmp_path, capsys):
    from privtune.simulate import simulate

    out = tmp_path / "run"
    cfg = FederationConfig.from_run_config(
        {
            "num-server-rounds": 1,
            "model": "tiny-llama",
            "local-steps": 5,
            "max-train-blocks": 256,
            "run-dir": str(out / "server"),
            "min-train-nodes": 2,
        }
    )
    nodes = plant_secrets(cfg, 2, out, canaries=2, repeats=(1, 4))
    assert (out / SECRETS_FILE).exists() and "data-path" in nodes[0]
    simulate(cfg, 2, out, nodes)
    # the model owner's side of the run holds no secret
    server_files = "".join(p.read_text(errors="ignore") for p in (out / "server").rglob("*.json"))
    for canary in json.loads((out / SECRETS_FILE).read_text())["canaries"]:
        assert canary["secret"] not in server_files

    assert main(["audit", "--run", str(out), "--out", str(tmp_path / "audit")]) == 0
    report = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert set(report["auc"]) == {"public", "plugin", "adapter:owner-0"}
    assert set(report["auc"]["plugin"]) == {"loss", "min_k", "reference"}
    assert set(report["exposure"]["plugin"]) == {"1", "4"}
    assert report["bounds"]["public"]["auc_bound"] == pytest.approx(0.5, abs=1e-6)
    assert report["bounds"]["plugin"] == {"claim": None}
    assert (tmp_path / "audit" / "roc.png").stat().st_size > 0
    assert "How to read this" in (tmp_path / "audit" / "report.md").read_text()

    assert main(["audit", "--run", str(out), "--owner", "owner-1", "--out", str(tmp_path / "x")]) == 2
    assert "belong to owner-0, not owner-1" in capsys.readouterr().err


def test_a_run_without_secrets_is_refused_with_how_to_make_one(tmp_path):
    server = tmp_path / "server"
    server.mkdir()
    (server / "metrics.json").write_text(json.dumps({"config": {"model": "tiny-llama"}}))
    with pytest.raises(PrivtuneError, match="--canaries"):
        from privtune.audit.measure import audit_run

        audit_run(tmp_path)
