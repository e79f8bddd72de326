import json

import pytest

from privtune.audit.measure import AuditResult, audit_service
from privtune.audit.secrets import AuditSecrets
from privtune.audit.service import POSITIONS, plan_records, prefixes
from privtune.common.errors import PrivtuneError
from tests.server.inference.running import MODEL, running_service


def test_the_attack_asks_only_what_the_budget_pays_for_and_refuses_below_ten_pairs():
    members, non_members = [f"m{i}" for i in range(30)], [f"n{i}" for i in range(25)]
    assert plan_records(members, non_members, 1000) == (members[:25], non_members[:25])
    assert plan_records(members, non_members, 20 * POSITIONS + 7) == (members[:10], non_members[:10])
    with pytest.raises(PrivtuneError, match=f"at least {20 * POSITIONS}"):
        plan_records(members, non_members, 20 * POSITIONS - 1)


def test_prefixes_cut_the_second_half_of_a_record():
    assert prefixes(list(range(3))) == []
    cuts = prefixes(list(range(40)))
    assert len(cuts) == POSITIONS and cuts[0] == 20 and cuts[-1] == 39


@pytest.mark.slow
def test_the_service_attack_spends_the_service_budget_and_is_held_to_its_claim(tmp_path):
    run = tmp_path / "run"
    (run / "server").mkdir(parents=True)
    (run / "server" / "metrics.json").write_text(json.dumps({"config": {"model": MODEL}}))
    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "owls", "watch"]
    records = [" ".join(words[i % 5 :] + words[: i % 5]) + f" {i}" for i in range(24)]
    AuditSecrets("owner-0", records[:12], records[12:]).save(run)
    queries = 20 * POSITIONS + 3  # pays for ten pairs, not eleven
    with running_service(tmp_path / "service", queries=queries, num_replicas=1) as service:
        result = AuditResult("owner-0", 12, 12)
        audit_service(result, run, service.address)
        status = service.service.budget_status()
    assert result.service_records == 10 and result.queries_spent == 20 * POSITIONS
    assert status["queries_spent"] == result.queries_spent
    assert set(result.auc["pmixed-service"]) == {"next_token_match"}
    bound = result.bounds["pmixed-service"]
    assert (bound["epsilon"], bound["delta"]) == (8.0, 1e-5) and 0.99 < bound["auc_bound"] <= 1.0
    assert result.violations == []
