"""The budget keeper on a real ledger file, and a replica that pays before it releases."""

from __future__ import annotations

import multiprocessing
import shutil
from pathlib import Path

import pytest

from privtune.common.errors import BudgetExceededError, PrivtuneError
from privtune.common.ledger import Ledger, render
from privtune.common.ledger.registry import forget
from privtune.common.pmixed import PMixedBudget
from privtune.server.inference.budget import BudgetKeeper, member_artefacts
from privtune.server.inference.members import ServedModel
from privtune.server.inference.replica import Replica, ReplicaConfig
from tests.server.inference.running import MODEL, make_adapters

BUDGET = PMixedBudget(epsilon=6.0, delta=1e-5, alpha=3, T=10, q=0.3, n_members=4)


def keeper(path: str, budget: PMixedBudget = BUDGET, artefacts: dict[str, str] | None = None) -> BudgetKeeper:
    """A keeper whose ledger registry sits beside its ledger (never the user's)."""
    return BudgetKeeper(path, budget, artefacts or {}, path + ".registry.json")


def test_exactly_T_queries_then_a_clear_refusal(tmp_path):
    service = keeper(str(tmp_path / "ledger.sqlite"))
    assert [service.spend() for _ in range(10)] == list(range(9, -1, -1))
    with pytest.raises(BudgetExceededError) as refused:
        service.spend()
    message = str(refused.value)
    assert "10 of 10 queries spent" in message and "No token was released" in message
    assert f"privtune ledger budget {tmp_path / 'ledger.sqlite'} pmixed" in message
    status = service.status()
    assert status["exhausted"] and status["queries_spent"] == 10
    assert status["epsilon_spent"] == pytest.approx(6.0, abs=1e-9)
    assert status["rdp_spent"] == pytest.approx(BUDGET.rdp_total())


def test_spending_survives_a_restart_and_the_budget_cannot_be_reset_by_flags(tmp_path):
    path = str(tmp_path / "ledger.sqlite")
    first = keeper(path)
    for _ in range(4):
        first.spend()
    again = keeper(path)
    assert again.status()["queries_spent"] == 4 and again.spend() == 5
    # Another T or q only changes what each query costs; the RDP already spent still counts.
    finer = keeper(path, PMixedBudget(6.0, 1e-5, 3, T=20, q=0.3, n_members=4))
    assert finer.status()["queries_left"] == 10
    with pytest.raises(PrivtuneError, match="holds a PMixED budget"):
        keeper(path, PMixedBudget(8.0, 1e-5, 3, T=10, q=0.3, n_members=4))
    Ledger(tmp_path / "owner.sqlite", owner="owner-1")
    with pytest.raises(PrivtuneError, match="belongs to"):
        keeper(str(tmp_path / "owner.sqlite"))


def test_a_box_budget_and_a_ball_budget_share_one_ledger_and_each_entry_names_its_projection(tmp_path):
    path = str(tmp_path / "ledger.sqlite")
    box_budget = PMixedBudget(6.0, 1e-5, 3, T=10, q=1.0, n_members=4, projection="box", split=0.7)
    box = keeper(path, box_budget)
    box.spend()
    status = box.status()
    box_solved = box_budget.box()
    assert "beta" not in status and status["projection"] == "box" and status["split"] == 0.7
    assert (status["lower"], status["upper"]) == (box_solved.lower, box_solved.upper)
    ball = keeper(path)  # the same (epsilon, delta, alpha): RDP at one order adds up whatever the projection
    ball.spend()
    assert ball.status()["beta"] == BUDGET.beta() and ball.status()["queries_spent"] == 2
    assert [r.details["projection"] for r in Ledger(path).records("pmixed")] == ["box", "renyi"]
    with pytest.raises(PrivtuneError, match="integer"):
        keeper(str(tmp_path / "other.sqlite"), PMixedBudget(6.0, 1e-5, 3.5, T=10, q=1.0, n_members=4, projection="box"))


def _spend_all(path: str, out) -> None:
    spender = keeper(path)
    count = 0
    try:
        while True:
            spender.spend()
            count += 1
    except BudgetExceededError:
        out.put(count)


def test_two_processes_on_one_ledger_file_share_one_budget(tmp_path):
    path = str(tmp_path / "ledger.sqlite")
    queue = multiprocessing.get_context("spawn").Queue()
    workers = [multiprocessing.get_context("spawn").Process(target=_spend_all, args=(path, queue)) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert queue.get(timeout=5) + queue.get(timeout=5) == 10
    assert len(Ledger(path).records("pmixed")) == 10


def test_a_replica_charges_before_every_token(tmp_path):
    adapters = make_adapters(tmp_path / "adapters")
    spender = keeper(str(tmp_path / "ledger.sqlite"))
    replica = Replica(ReplicaConfig(ServedModel(MODEL, tuple(adapters)), BUDGET), spender)
    assert replica.next_token([5, 6, 7]).queries_remaining == 9
    session = replica.open([5, 6, 7], max_new_tokens=20)
    released = []
    with pytest.raises(BudgetExceededError):
        while True:
            released.append(replica.step(session))
    assert [r.queries_remaining for r in released] == list(range(8, -1, -1))
    assert spender.status()["queries_spent"] == 10
    with pytest.raises(PrivtuneError, match="positions"):
        replica.open([5] * 250, max_new_tokens=10)
    with pytest.raises(PrivtuneError, match="budget was computed for 3 members"):
        Replica(ReplicaConfig(ServedModel(MODEL, tuple(adapters)), PMixedBudget(6.0, 1e-5, 3, 10, 0.3, 3)), spender)


def test_members_are_bound_to_one_ledger(tmp_path):
    adapters = tuple(make_adapters(tmp_path / "adapters", n=2))
    served = ServedModel(MODEL, adapters)
    artefacts = member_artefacts(adapters, served.load_members())
    registry = str(tmp_path / "registry.json")
    first = BudgetKeeper(
        str(tmp_path / "run" / "ledger.sqlite"), PMixedBudget(6.0, 1e-5, 3, 10, 0.3, 2), artefacts, registry
    )
    first.spend()
    assert first.ledger.artefacts() == artefacts  # the ledger records what it pays for
    assert all(name in render(first.ledger.report()) for name in adapters)
    copies = tuple(str(tmp_path / "copy" / Path(a).name) for a in adapters)
    for source, copy in zip(adapters, copies):
        shutil.copytree(source, copy)  # the same members through another path
    moved = member_artefacts(copies, ServedModel(MODEL, copies).load_members())
    assert set(moved) == set(artefacts)
    with pytest.raises(PrivtuneError, match=r"already paid for by the ledger .*run/ledger.sqlite"):
        BudgetKeeper(str(tmp_path / "other.sqlite"), PMixedBudget(6.0, 1e-5, 3, 10, 0.3, 2), moved, registry)
    assert not Ledger(tmp_path / "other.sqlite").artefacts()
    again = BudgetKeeper(
        str(tmp_path / "run" / "ledger.sqlite"), PMixedBudget(6.0, 1e-5, 3, 10, 0.3, 2), moved, registry
    )
    assert again.status()["queries_spent"] == 1
    assert forget(Path(registry), tmp_path / "run" / "ledger.sqlite", set()) == 2  # what a reset does
    BudgetKeeper(str(tmp_path / "other.sqlite"), PMixedBudget(6.0, 1e-5, 3, 10, 0.3, 2), moved, registry)
