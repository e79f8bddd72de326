"""The gRPC API over TLS with deploy/certs.sh's certificates; plaintext only on loopback or on request."""

from __future__ import annotations

import argparse

import pytest

from privtune.client.query import InferenceClient
from privtune.common.errors import PrivtuneError
from privtune.server.inference import cli
from tests.deploy.conftest import make_certs
from tests.server.inference.running import running_service


def serve_args(*argv: str) -> cli.ServeConfig:
    parser = argparse.ArgumentParser()
    cli.configure(parser)
    return cli.ServeConfig.from_args(parser.parse_args(["--model", "tiny-llama", "--adapters", "a", *argv]))


def test_plaintext_is_refused_off_loopback_unless_asked_for(tmp_path):
    assert cli.server_credentials(serve_args()) is None  # 127.0.0.1
    with pytest.raises(PrivtuneError, match="plaintext.*--tls-cert"):
        cli.server_credentials(serve_args("--host", "0.0.0.0"))
    assert cli.server_credentials(serve_args("--host", "0.0.0.0", "--insecure")) is None
    with pytest.raises(PrivtuneError, match="both --tls-cert and --tls-key"):
        cli.server_credentials(serve_args("--tls-cert", "server.pem"))
    with pytest.raises(PrivtuneError, match="cannot read the TLS files"):
        cli.server_credentials(serve_args("--tls-cert", str(tmp_path / "x.pem"), "--tls-key", str(tmp_path / "x.key")))


@pytest.mark.slow
def test_tls_service_answers_clients_that_trust_its_ca_only(tmp_path):
    certs, other = tmp_path / "certs", tmp_path / "other"
    for folder in (certs, other):
        made = make_certs(folder, 0)
        assert made.returncode == 0, made.stderr
    tls = {"tls_cert": str(certs / "server.pem"), "tls_key": str(certs / "server.key")}
    with running_service(tmp_path / "service", queries=4, num_replicas=1, **tls) as service:
        with InferenceClient(service.address, timeout=20, tls_ca=(certs / "ca.crt").read_bytes()) as client:
            assert client.health()["status"] == "SERVING"
            assert client.next_token([5, 6, 7]).queries_remaining == 3
        with InferenceClient(service.address, timeout=20) as plaintext, pytest.raises(PrivtuneError, match="--tls-ca"):
            plaintext.health()
        with InferenceClient(service.address, timeout=20, tls_ca=(other / "ca.crt").read_bytes()) as stranger:
            with pytest.raises(PrivtuneError):
                stranger.health()
        assert service.service.budget_status()["queries_spent"] == 1
