"""The service end to end on Ray and loopback gRPC: one budget for all replicas, never overspent."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from privtune.cli import main as privtune
from privtune.client.query import InferenceClient, projection_text
from privtune.common.errors import BudgetExceededError, PrivtuneError
from privtune.common.inference_api import MAX_PROMPT_TEXT_BYTES
from privtune.common.ledger import RELATIVE_TOLERANCE, Ledger
from privtune.common.proto_gen.privtune.v1 import inference_pb2 as pb
from privtune.common.proto_gen.privtune.v1 import inference_pb2_grpc as pb_grpc
from tests.server.inference.running import running_service

pytestmark = pytest.mark.slow

T = 16


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    with running_service(tmp_path_factory.mktemp("pmixed"), queries=T, num_replicas=2) as running:
        yield running


def spent(service) -> int:
    return service.service.budget_status()["queries_spent"]


def test_health_and_budget_status(service):
    with InferenceClient(service.address) as client:
        health, budget = client.health(), client.budget_status()
    assert health == {"status": "SERVING", "replicas": 2, "n_members": 4, "model": "tiny-llama", "vocab_size": 259}
    assert budget["queries_total"] == T and budget["alpha"] == service.budget.alpha and budget["n_members"] == 4
    assert budget["rdp_total"] == pytest.approx(service.budget.rdp_total())
    assert budget["beta"] == 0.0  # the default box projection has no beta; the proto's field is left unset
    assert budget["ledger"] == str(service.ledger)
    box = service.budget.box()
    local = service.service.budget_status()
    assert local["projection"] == "box" and (local["lower"], local["upper"]) == (box.lower, box.upper)
    assert budget["projection"] == "box" and (budget["box_lower"], budget["box_upper"]) == (box.lower, box.upper)
    assert f"e^-{box.lower:.3g} to e^{box.upper:.3g} times" in projection_text(budget)


def test_each_released_token_is_one_query(service):
    before = spent(service)
    with InferenceClient(service.address) as client:
        one = client.next_token("To be, or not")
        streamed = list(client.generate([5, 6, 7], max_new_tokens=3))
    assert 0 <= one.id < 259 and len(streamed) == 3
    assert one.queries_remaining == T - before - 1
    assert [t.queries_remaining for t in streamed] == [T - before - 2, T - before - 3, T - before - 4]
    assert spent(service) == before + 4


def test_a_client_that_stops_reading_stops_the_spending(service):
    before = spent(service)
    with InferenceClient(service.address) as client:
        stream = client.generate("abc", max_new_tokens=10)
        first = [next(stream), next(stream)]
        stream.close()
    time.sleep(1.0)
    assert len(first) == 2
    assert before + 2 <= spent(service) <= before + 3  # at most the token in flight when the client left


def test_query_cli_prints_status_and_a_continuation(service, capsys):
    assert privtune(["query", "--address", service.address, "--status"]) == 0
    assert "members of tiny-llama" in capsys.readouterr().out
    before = spent(service)
    assert privtune(["query", "--address", service.address, "--prompt", "Hello", "--max-new-tokens", "2"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("Hello") and "2 token(s) privately sampled" in captured.err
    assert spent(service) == before + 2


def test_two_concurrent_clients_spend_the_budget_and_never_more(service):
    left = T - spent(service)
    assert left >= 4
    released: list[list[int]] = [[], []]
    refusals: list[str] = []

    def client_loop(slot: int) -> None:
        with InferenceClient(service.address) as client:
            try:
                while True:
                    released[slot].append(client.next_token("the same prompt").id)
            except BudgetExceededError as err:
                refusals.append(str(err))

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(refusals) == 2
    assert len(released[0]) + len(released[1]) == left
    assert released[0] and released[1]  # both clients were served, by a shared budget
    ledger = Ledger(service.ledger)
    records = ledger.records("pmixed")
    assert len(records) == T and {r.details["projection"] for r in records} == {"box"}
    assert records[-1].total <= ledger.budget("pmixed").cap * (1 + RELATIVE_TOLERANCE)


def test_an_exhausted_service_refuses_with_resource_exhausted(service):
    channel = grpc.insecure_channel(service.address)
    stub = pb_grpc.InferenceStub(channel)
    with InferenceClient(service.address) as client:  # exhaust whatever is left if run on its own
        try:
            while True:
                client.next_token("x")
        except BudgetExceededError:
            pass
    with pytest.raises(grpc.RpcError) as refused:
        stub.NextToken(pb.NextTokenRequest(prompt=pb.Prompt(text="more")), timeout=60)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"{T} of {T} queries spent" in refused.value.details()
    assert "privtune ledger budget" in refused.value.details()
    with pytest.raises(grpc.RpcError) as streamed:
        list(stub.Generate(pb.GenerateRequest(prompt=pb.Prompt(text="more"), max_new_tokens=2), timeout=60))
    assert streamed.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    status = stub.BudgetStatus(pb.BudgetStatusRequest(), timeout=60)
    assert status.exhausted and status.queries_spent == T
    assert status.epsilon_spent == pytest.approx(8.0, abs=1e-6)
    assert stub.Health(pb.HealthRequest(), timeout=60).status == pb.HealthResponse.SERVING
    channel.close()


def test_invalid_prompts_are_invalid_argument(service):
    channel = grpc.insecure_channel(service.address)
    stub = pb_grpc.InferenceStub(channel)
    with pytest.raises(grpc.RpcError) as bad:
        stub.NextToken(pb.NextTokenRequest(prompt=pb.Prompt(token_ids=pb.TokenIds(ids=[5, 100000]))), timeout=60)
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "outside the model's vocabulary" in bad.value.details()
    channel.close()


def test_an_oversized_prompt_is_invalid_argument_not_a_budget_refusal(service):
    before = spent(service)
    channel = grpc.insecure_channel(service.address)
    stub = pb_grpc.InferenceStub(channel)
    with pytest.raises(grpc.RpcError) as big:
        stub.NextToken(pb.NextTokenRequest(prompt=pb.Prompt(text="x" * 5_000_000)), timeout=60)
    assert big.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"at most {MAX_PROMPT_TEXT_BYTES} bytes" in big.value.details()
    with pytest.raises(grpc.RpcError) as many:
        stub.NextToken(pb.NextTokenRequest(prompt=pb.Prompt(token_ids=pb.TokenIds(ids=[5] * 70_000))), timeout=60)
    assert many.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    channel.close()
    with InferenceClient(service.address) as client:
        with pytest.raises(PrivtuneError, match="at most") as refused:
            client.next_token("x" * 5_000_000)
        assert not isinstance(refused.value, BudgetExceededError)
        with pytest.raises(PrivtuneError, match="too large") as huge:  # past gRPC's own message limit
            client.next_token("x" * 20_000_000)
        assert not isinstance(huge.value, BudgetExceededError)
    assert spent(service) == before
