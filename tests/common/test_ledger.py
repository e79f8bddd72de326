import json
import multiprocessing
import sqlite3
import time

import pytest

from privtune.cli import main
from privtune.common.errors import BudgetExceededError, PrivtuneError
from privtune.common.ledger import Budget, Ledger, render
from privtune.common.privacy.rdp import epsilon_to_rdp

SANTEXT = "any two tokens of the smollm2 vocabulary (49152 tokens)"
CUSTEXT = "two tokens in the same CusText cell (20 to 40 tokens of the smollm2 vocabulary)"


def test_the_pmixed_budget_is_the_shared_rdp_conversion():
    assert Budget("pmixed", 8.0, 1e-5, 3.0).cap == epsilon_to_rdp(8.0, 1e-5, 3.0)


def test_refuses_over_budget_and_records_nothing(tmp_path):
    ledger = Ledger(tmp_path / "l.db", owner="alice")
    ledger.set_budget("ldp", 10.0)
    ledger.spend("ldp", 6.0, subject="doc", scope=SANTEXT)
    with pytest.raises(BudgetExceededError) as refused:
        ledger.spend("ldp", 4.5, subject="doc", scope=SANTEXT)
    message = str(refused.value)
    assert "4.5" in message and "left" in message and "privtune ledger budget" in message and "doc" in message
    assert [r.amount for r in ledger.records()] == [6.0]
    ledger.spend("ldp", 4.0, subject="doc", scope=SANTEXT)  # exactly fills it
    ledger.spend("ldp", 9.0, subject="other", scope=SANTEXT)  # budgets are per document
    assert ledger.remaining("ldp", "doc", SANTEXT) == pytest.approx(0.0)
    assert ledger.total("ldp", "other", SANTEXT) == 9.0


def test_dry_run_checks_without_recording(tmp_path):
    ledger = Ledger(tmp_path / "l.db")
    ledger.set_budget("ldp", 1.0)
    assert ledger.spend("ldp", 0.5, scope=SANTEXT, dry_run=True).id == 0
    with pytest.raises(BudgetExceededError):
        ledger.spend("ldp", 1.5, scope=SANTEXT, dry_run=True)
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
    first.spend("ldp", 2.0, subject="doc", details={"token_epsilon": 0.5, "scope": SANTEXT})
    del first
    again = Ledger(path)
    assert again.owner == "alice" and again.total("ldp", "doc", SANTEXT) == 2.0 and again.budget("ldp").epsilon == 5.0
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
    ledger.spend("ldp", 12.0, subject="a", scope=SANTEXT, details={"token_epsilon": 0.4})
    ledger.spend("ldp", 3.0, subject="b", scope=SANTEXT, details={"token_epsilon": 0.4})
    ledger.set_budget("dpsgd", 8.0, delta=1e-5)
    ledger.set_cumulative("dpsgd", 1.5, delta=1e-5, details={"steps": 40})
    report = ledger.report()
    by_kind = {g["kind"]: g for g in report["guarantees"]}
    assert by_kind["ldp"]["unit"] == "document" and by_kind["ldp"]["max_document_epsilon"] == 12.0
    assert by_kind["ldp"]["max_token_epsilon"] == 0.4 and by_kind["ldp"]["subjects"] == 2
    assert by_kind["dpsgd"]["unit"] == "training example" and by_kind["dpsgd"]["steps"] == 40
    assert "(1.5, 1e-05)-DP" in by_kind["dpsgd"]["statement"]
    text = render(ledger.report())
    assert "document" in text and "training example" in text and "owner alice" in text
    assert main(["ledger", "show", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(report))
    assert main(["ledger", "show", str(path)]) == 0
    assert "never added together" in capsys.readouterr().out
    assert main(["ledger", "show", str(tmp_path / "none.db")]) == 2


def test_guarantees_of_different_scopes_are_never_summed(tmp_path):
    ledger = Ledger(tmp_path / "l.db", owner="alice")
    ledger.set_budget("ldp", 10.0)
    ledger.spend("ldp", 8.0, subject="doc", scope=SANTEXT, details={"token_epsilon": 0.5})
    ledger.spend("ldp", 8.0, subject="doc", scope=CUSTEXT, details={"token_epsilon": 0.5})  # a separate promise
    with pytest.raises(BudgetExceededError, match="same CusText cell"):
        ledger.spend("ldp", 2.5, subject="doc", scope=CUSTEXT)
    assert ledger.total("ldp", "doc", SANTEXT) == 8.0 and ledger.total("ldp", "doc", CUSTEXT) == 8.0
    ldp = [g for g in ledger.report()["guarantees"] if g["kind"] == "ldp"]
    assert sorted(g["scope"] for g in ldp) == sorted([SANTEXT, CUSTEXT])
    assert [g["max_document_epsilon"] for g in ldp] == [8.0, 8.0]  # not 16 in one currency
    assert all(g["scope"] in g["statement"] for g in ldp)
    with pytest.raises(PrivtuneError, match="scope"):
        ledger.spend("ldp", 1.0, subject="doc")  # an LDP amount without a scope cannot be placed
    with pytest.raises(PrivtuneError, match="one scope"):
        ledger.spend("pmixed", 0.1, alpha=3.0, scope=SANTEXT)


def test_a_scope_given_in_the_release_details_is_used(tmp_path):
    ledger = Ledger(tmp_path / "l.db")
    record = ledger.spend("ldp", 1.0, subject="doc", details={"scope": CUSTEXT, "token_epsilon": 0.1})
    assert record.scope == CUSTEXT and ledger.total("ldp", "doc", CUSTEXT) == 1.0


def _spent_ledger(path):
    ledger = Ledger(path, owner="alice")
    ledger.set_budget("ldp", 10.0)
    ledger.spend("ldp", 7.0, subject="doc", scope=SANTEXT)
    ledger.close()


@pytest.mark.parametrize("damage", ["delete", "truncate", "replace", "roll back"])
def test_a_ledger_that_existed_never_comes_back_empty(tmp_path, damage):
    path = tmp_path / "l.db"
    _spent_ledger(path)
    if damage == "delete":
        path.unlink()
    elif damage == "truncate":
        path.write_bytes(b"")
    elif damage == "replace":
        path.unlink()
        Ledger(tmp_path / "other.db", owner="alice").close()
        (tmp_path / "other.db").rename(path)
    else:
        older = tmp_path / "older.db"
        with Ledger(path) as ledger:
            ledger.backup(older)
            ledger.spend("ldp", 1.0, subject="doc", scope=SANTEXT)
        older.replace(path)
    for attempt in (lambda: Ledger(path, owner="alice"), lambda: Ledger(path, read_only=True)):
        with pytest.raises(PrivtuneError, match="privtune ledger reset"):
            attempt()
    assert main(["ledger", "show", str(path)]) == 2


def test_an_explicit_reset_is_logged_and_keeps_the_old_file(tmp_path, capsys):
    path = tmp_path / "l.db"
    _spent_ledger(path)
    path.write_bytes(b"")
    assert main(["ledger", "reset", str(path), "--reason", "test: start over"]) == 0
    log = [json.loads(line) for line in (tmp_path / "l.db.resets.log").read_text().splitlines()]
    assert log[0]["reason"] == "test: start over" and log[0]["marker"]["releases"] == 1
    assert (tmp_path / log[0]["moved_to"]).exists()
    assert Ledger(path).records() == []


def test_show_never_writes_a_file(tmp_path):
    empty, foreign = tmp_path / "empty.db", tmp_path / "foreign.db"
    empty.write_bytes(b"")
    sqlite3.connect(foreign).executescript("CREATE TABLE notes (text TEXT); INSERT INTO notes VALUES ('mine');")
    before = {p: p.read_bytes() for p in (empty, foreign)}
    for path in before:
        assert main(["ledger", "show", str(path)]) == 2
        assert path.read_bytes() == before[path]
    assert not list(tmp_path.glob("*.marker.json"))
    _spent_ledger(tmp_path / "l.db")
    shown = Ledger(tmp_path / "l.db", read_only=True)
    for write in (lambda: shown.spend("ldp", 1.0, subject="doc", scope=SANTEXT), lambda: shown.set_budget("ldp", 1.0)):
        with pytest.raises(PrivtuneError, match="read-only"):
            write()
    with pytest.raises(PrivtuneError, match="not a privtune ledger"):
        Ledger(foreign)  # a writable open refuses it untouched too
    assert foreign.read_bytes() == before[foreign]


def test_after_a_clean_close_the_main_file_alone_holds_every_release(tmp_path, capsys):
    path = tmp_path / "l.db"
    ledger = Ledger(path, owner="alice")
    ledger.spend("ldp", 3.0, subject="doc", scope=SANTEXT)
    ledger.close()
    copy = tmp_path / "copy" / "l.db"
    copy.parent.mkdir()
    copy.write_bytes(path.read_bytes())
    assert Ledger(copy, read_only=True).total("ldp", "doc", SANTEXT) == 3.0
    assert main(["ledger", "backup", str(path), str(tmp_path / "backup.db")]) == 0
    assert Ledger(tmp_path / "backup.db", read_only=True).total("ldp", "doc", SANTEXT) == 3.0
    assert "backup.db" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["ledger", "--help"])
    assert "ledger backup" in capsys.readouterr().out  # the help says how to back up


@pytest.mark.parametrize(
    "flags",
    [
        ["pmixed", "--epsilon", "8", "--delta", "1e-5", "--alpha", "inf"],
        ["pmixed", "--epsilon", "8", "--delta", "1e-5", "--alpha", "nan"],
        ["pmixed", "--epsilon", "inf", "--delta", "1e-5", "--alpha", "3"],
        ["pmixed", "--epsilon", "8", "--delta", "nan", "--alpha", "3"],
        ["dpsgd", "--epsilon", "nan", "--delta", "1e-5"],
        ["ldp", "--epsilon", "inf"],
    ],
)
def test_every_numeric_budget_input_is_finite(tmp_path, flags):
    path = tmp_path / "l.db"
    with pytest.raises(SystemExit):
        main(["ledger", "budget", str(path), *flags])
    assert not path.exists()
    with pytest.raises(PrivtuneError):
        Budget(flags[0], *[float(v) for v in flags[2::2]])


def test_a_format_1_ledger_gets_its_scopes(tmp_path):
    path = tmp_path / "v1.db"
    con = sqlite3.connect(path)
    con.executescript(
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
        "CREATE TABLE budgets (kind TEXT PRIMARY KEY, epsilon REAL NOT NULL, delta REAL NOT NULL, alpha REAL);"
        "CREATE TABLE records (id INTEGER PRIMARY KEY AUTOINCREMENT, time REAL NOT NULL, kind TEXT NOT NULL, "
        "subject TEXT NOT NULL, amount REAL NOT NULL, total REAL NOT NULL, delta REAL NOT NULL, alpha REAL, "
        "details TEXT NOT NULL);"
        "INSERT INTO meta VALUES ('format', 'privtune-ledger'), ('version', '1'), ('owner', 'alice');"
    )
    for amount, total, scope in ((2.0, 2.0, SANTEXT), (3.0, 5.0, CUSTEXT), (1.0, 6.0, SANTEXT)):
        con.execute(
            "INSERT INTO records (time, kind, subject, amount, total, delta, alpha, details) "
            "VALUES (0, 'ldp', 'doc', ?, ?, 0, NULL, ?)",
            (amount, total, json.dumps({"scope": scope})),
        )
    con.commit()
    con.close()
    assert Ledger(path, read_only=True).total("ldp", "doc", SANTEXT) == 3.0  # a snapshot, migrated in memory
    assert sqlite3.connect(path).execute("SELECT value FROM meta WHERE key = 'version'").fetchone() == ("1",)
    ledger = Ledger(path)
    assert ledger.total("ldp", "doc", SANTEXT) == 3.0 and ledger.total("ldp", "doc", CUSTEXT) == 3.0
