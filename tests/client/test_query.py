"""``privtune query`` and its client against a real service (Ray, loopback gRPC)."""

from __future__ import annotations

import pytest

from privtune.cli import main as privtune
from privtune.client.query import InferenceClient, sample
from privtune.common.errors import BudgetExceededError, PrivtuneError
from privtune.common.ult.config import UltConfig
from privtune.common.ult.keys import new_key_file
from privtune.common.ult.table import build_table, save_table
from privtune.common.ult.tokenizer import UltTokenizer
from tests.server.inference.running import running_service

TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 20


def test_unreachable_service_is_a_clear_error():
    with (
        InferenceClient("127.0.0.1:1", timeout=5) as client,
        pytest.raises(PrivtuneError, match="cannot reach a privtune service"),
    ):
        client.budget_status()
    assert privtune(["query", "--address", "127.0.0.1:1", "--key-file", "k"]) == 2


def test_unreadable_tls_ca_is_a_clear_error(tmp_path, capsys):
    assert privtune(["query", "--address", "127.0.0.1:1", "--status", "--tls-ca", str(tmp_path / "ca.crt")]) == 2
    assert "cannot read --tls-ca" in capsys.readouterr().err


@pytest.mark.slow
def test_ult_prompt_is_encoded_and_the_output_decoded_locally(tmp_path, capsys):
    # A table whose ids fit the tiny model's 259-token vocabulary; the key stays on this side.
    table_path = save_table(build_table([TEXT], UltConfig(vocab_size=200)), tmp_path / "table.json")
    key_path = tmp_path / "owner.key"
    new_key_file(key_path)
    ult = UltTokenizer.from_files(table_path, key_file=key_path)
    with running_service(tmp_path, queries=8, num_replicas=1, q=0.5) as service:
        with InferenceClient(service.address) as client:
            result = sample(client, "To be, or not", 4, ult=ult)
            assert len(result.ids) == 4 and all(0 <= i < 259 for i in result.ids)
            assert result.text == ult.decode(result.ids)
            assert result.queries_remaining == 4
        assert (
            privtune(
                [
                    "query",
                    "--address",
                    service.address,
                    "--prompt",
                    "whether 'tis",
                    "--max-new-tokens",
                    "3",
                    "--table",
                    str(table_path),
                    "--key-file",
                    str(key_path),
                ]
            )
            == 0
        )
        captured = capsys.readouterr()
        assert (
            captured.out.startswith("whether 'tis") and "3 token(s) privately sampled; 1 queries left" in captured.err
        )
        assert privtune(["query", "--address", service.address, "--prompt", "x", "--max-new-tokens", "2"]) == 2
        assert "privacy budget exhausted" in capsys.readouterr().err
        with InferenceClient(service.address) as client, pytest.raises(BudgetExceededError, match="8 of 8 queries"):
            client.next_token("x")
