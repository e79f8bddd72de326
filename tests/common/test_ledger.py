import json
import math
import multiprocessing
import sqlite3
import time

import pytest

from privtune.cli import main
from privtune.common.errors import BudgetExceededError, PrivtuneError
from privtune.common.ledger import Ledger, rdp_budget, rdp_to_epsilon


def test_rdp_budget_inverts_the_conversion_and_matches_the_design_defaults():
    # DESIGN.md defaults: eps 8, delta 1e-5, alpha 3
    budget = rdp_budget(8.0, 1e-5, 3.0)
    assert budget == pytest.approx(8.0 - math.log(2 / 3) + (math.log(1e-5) + math.log(3)) / 2)
    assert rdp_to_epsilon(budget, 1e-5, 3.0) == pytest.approx(8.0)


def test_refuses_over_budget_and_records_nothing(tmp_path):
    ledger = Ledger(tmp_path / "l.db", owner="alice")
    ledger.set_budget("ldp", 10.0)
    ledger.spend("ldp", 6.0, subject="doc")
    with pytest.raises(BudgetExceededError) as refused:
        ledger.spend("ldp", 4.5, subject="doc")
    message = str(refused.value)
    assert "4.5" in message and "left" in message and "privtune ledger budget" in message and "doc" in message
    assert [r.amount for r in ledger.records()] == [6.0]
    ledger.spend("ldp", 4.0, subject="doc")  # exactly fills it
    ledger.spend("ldp", 9.0, subject="other")  # budgets are per document
    assert ledger.remaining("ldp", "doc") == pytest.approx(0.0)
    assert ledger.total("ldp", "other") == 9.0


def test_dry_run_checks_without_recording(tmp_path):
    ledger = Ledger(tmp_path / "l.db")
    ledger.set_budget("ldp", 1.0)
    assert ledger.spend("ldp", 0.5, dry_run=True).id == 0
    with pytest.raises(BudgetExceededError):
        ledger.spend("ldp", 1.5, dry_run=True)
    assert ledger.records() == []


def test_exactly_t_queries_of_budget_over_t_fit(tmp_path):
    ledger = Ledger(tmp_path / "service.db", owner="inference")
    budget = ledger.set_budget("pmixed", 8.0, delta=1e-5, alpha=3.0)
    queries = 1024
    for _ in range(queries):
        ledger.spend("pmixed", budget.cap / queries, alpha=3.0)
    with pytest.raises(BudgetExceededError):
        ledger.spend("pmixed", budget.cap / queries, alpha=3.0)
    with pytest.raises(BudgetExceededError):
        ledger.spend("pmixed", budget.cap * 1e-6, alpha=3.0)  # far above the float tolerance of 1e-9
    report = ledger.report()["guarantees"][0]
    assert report["queries"] == queries and report["epsilon"] == pytest.approx(8.0) and report["unit"].endswith("shard")


def test_pmixed_orders_must_agree(tmp_path):
    ledger = Ledger(tmp_path / "l.db")
    ledger.set_budget("pmixed", 8.0, delta=1e-5, alpha=3.0)
    with pytest.raises(PrivtuneError, match="order"):
        ledger.spend("pmixed", 0.01, alpha=4.0)
    with pytest.raises(PrivtuneError, match="alpha"):
        ledger.spend("pmixed", 0.01)


def test_cumulative_spending_is_set_not_added(tmp_path):
    ledger = Ledger(tmp_path / "l.db")
    ledger.set_budget("dpsgd", 3.0, delta=1e-5)
    ledger.set_cumulative("dpsgd", 1.0, delta=1e-5, details={"steps": 10})
    ledger.set_cumulative("dpsgd", 2.5, delta=1e-5, details={"steps": 10})
    assert ledger.total("dpsgd") == 2.5
    assert [r.amount for r in ledger.records("dpsgd")] == [1.0, 1.5]
    with pytest.raises(BudgetExceededError):
        ledger.set_cumulative("dpsgd", 3.2, delta=1e-5)
    with pytest.raises(PrivtuneError, match="cannot decrease"):
        ledger.set_cumulative("dpsgd", 2.0, delta=1e-5)
    with pytest.raises(PrivtuneError, match="delta"):
        ledger.set_cumulative("dpsgd", 2.6, delta=1e-3)
    with pytest.raises(PrivtuneError, match="set_cumulative"):
        ledger.spend("dpsgd", 0.1)
    # the total may be computed from the records inside the transaction
    ledger.set_cumulative("dpsgd", lambda records: records[-1].total + 0.25, delta=1e-5, details={"steps": 5})
    assert ledger.total("dpsgd") == 2.75


def test_survives_a_restart_and_keeps_its_owner(tmp_path):
    path = tmp_path / "l.db"
    first = Ledger(path, owner="alice")
    first.set_budget("ldp", 5.0)
    first.spend("ldp", 2.0, subject="doc", details={"token_epsilon": 0.5})
    del first
    again = Ledger(path)
    assert again.owner == "alice" and again.total("ldp", "doc") == 2.0 and again.budget("ldp").epsilon == 5.0
    with pytest.raises(PrivtuneError, match="belongs to 'alice'"):
        Ledger(path, owner="bob")
    with pytest.raises(PrivtuneError, match="no privacy ledger"):
        Ledger(tmp_path / "missing.db", create=False)


def test_a_file_that_is_not_a_ledger_is_reported(tmp_path):
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database at all" * 100)
    with pytest.raises(PrivtuneError, match="unreadable"):
        Ledger(junk)
    other = tmp_path / "other.db"
    sqlite3.connect(other).executescript(
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT); INSERT INTO meta VALUES ('format', 'something else');"
    )
    with pytest.raises(PrivtuneError, match="not a privtune ledger"):
        Ledger(other)


def _spend_until_refused(path: str, amount: float, start, results) -> None:
    ledger = Ledger(path)
    start.wait()  # all workers (and the test) meet here, so they spend at the same time
    accepted = 0
    while True:
        try:
            ledger.spend("pmixed", amount, alpha=3.0)
            accepted += 1
        except BudgetExceededError:
            break
        time.sleep(0.002)  # like a service answering a query between spends (SQLite's lock is not fair)
    results.put(accepted)


def test_concurrent_spenders_never_overspend(tmp_path):
    path = tmp_path / "shared.db"
    ledger = Ledger(path, owner="inference")
    budget = ledger.set_budget("pmixed", 8.0, delta=1e-5, alpha=3.0)
    allowed, amount = 200, budget.cap / 200
    context = multiprocessing.get_context("spawn")
    start, results = context.Barrier(5), context.Queue()
    workers = [context.Process(target=_spend_until_refused, args=(str(path), amount, start, results)) for _ in range(4)]
    for worker in workers:
        worker.start()
    start.wait(timeout=60)
    accepted = [results.get(timeout=60) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
    assert sum(accepted) == allowed
    assert sum(1 for a in accepted if a > 0) >= 2, "the workers did not actually interleave"
    records = ledger.records("pmixed")
    assert len(records) == allowed and records[-1].total <= budget.cap * (1 + 1e-9)
    totals = [r.total for r in records]
    assert totals == sorted(totals) and totals[-1] == pytest.approx(sum(r.amount for r in records))


def test_report_states_every_guarantee_with_its_unit(tmp_path, capsys):
    path = tmp_path / "l.db"
    ledger = Ledger(path, owner="alice")
    ledger.spend("ldp", 12.0, subject="a", details={"token_epsilon": 0.4})
    ledger.spend("ldp", 3.0, subject="b", details={"token_epsilon": 0.4})
    ledger.set_budget("dpsgd", 8.0, delta=1e-5)
    ledger.set_cumulative("dpsgd", 1.5, delta=1e-5, details={"steps": 40})
    report = ledger.report()
    by_kind = {g["kind"]: g for g in report["guarantees"]}
    assert by_kind["ldp"]["unit"] == "document" and by_kind["ldp"]["max_document_epsilon"] == 12.0
    assert by_kind["ldp"]["max_token_epsilon"] == 0.4 and by_kind["ldp"]["subjects"] == 2
    assert by_kind["dpsgd"]["unit"] == "training example" and by_kind["dpsgd"]["steps"] == 40
    assert "(1.5, 1e-05)-DP" in by_kind["dpsgd"]["statement"]
    text = ledger.render()
    assert "document" in text and "training example" in text and "owner alice" in text
    assert main(["ledger", "show", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(report))
    assert main(["ledger", "show", str(path)]) == 0
    assert "guarantees:" in capsys.readouterr().out
    assert main(["ledger", "show", str(tmp_path / "none.db")]) == 2
