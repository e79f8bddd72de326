"""deploy/certs.sh: a CA, a SuperLink certificate that TLS clients accept for every name it should
cover, node key pairs in the form Flower 1.41 loads; re-runs keep what exists, --force starts over."""

from __future__ import annotations

import socket
import ssl
import subprocess
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key

from tests.deploy.conftest import DEPLOY, make_certs

HOST = "superlink.example.org"


def contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def handshake(certs: Path, server_hostname: str, cafile: Path) -> str:
    """Serve one TLS connection with the SuperLink certificate on loopback; connect as a client
    that trusts only ``cafile`` and checks ``server_hostname``. Returns the negotiated version."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(certs / "server.pem", certs / "server.key")
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve() -> None:
            conn, _ = listener.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(1)
            except (ssl.SSLError, OSError):
                pass

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        client_ctx = ssl.create_default_context(cafile=str(cafile))
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                with client_ctx.wrap_socket(raw, server_hostname=server_hostname) as tls:
                    version = tls.version()
                    tls.send(b"x")
        finally:
            thread.join(timeout=10)
    return version


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("certs") / "certs"
    made = make_certs(out, 2, "--host", HOST, "--host", "10.1.2.3")
    assert made.returncode == 0, made.stderr
    return out


def test_server_certificate_names_and_chain(certs):
    cert = x509.load_pem_x509_certificate((certs / "server.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", HOST}
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "10.1.2.3"}
    ca = x509.load_pem_x509_certificate((certs / "ca.crt").read_bytes())
    assert cert.issuer == ca.subject
    cert.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    # Private keys are readable by their owner only.
    for key in ("ca.key", "server.key", "nodes/node-1"):
        assert (certs / key).stat().st_mode & 0o077 == 0, key


@pytest.mark.parametrize("name", ["localhost", HOST, "127.0.0.1"])
def test_tls_clients_trusting_the_ca_accept_the_superlink(certs, name):
    assert handshake(certs, name, certs / "ca.crt").startswith("TLS")


def test_tls_clients_reject_wrong_names_and_other_cas(certs, tmp_path):
    with pytest.raises(ssl.SSLCertVerificationError, match="match"):
        handshake(certs, "attacker.example.org", certs / "ca.crt")
    assert make_certs(tmp_path / "other", 0).returncode == 0
    with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer"):
        handshake(certs, "localhost", tmp_path / "other" / "ca.crt")


def test_node_keys_are_what_flower_loads(certs):
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    for i in (1, 2):
        private = load_ssh_private_key((certs / "nodes" / f"node-{i}").read_bytes(), None)  # as flower-supernode does
        assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
        registered = try_load_public_key(certs / "nodes" / f"node-{i}.pub")  # as `flwr supernode register` does
        assert registered == public_key_to_bytes(private.public_key())
    assert (certs / "nodes" / "node-1").read_bytes() != (certs / "nodes" / "node-2").read_bytes()


def test_rerun_keeps_everything_and_adds_missing_node_keys(certs, tmp_path):
    out = tmp_path / "c"
    assert make_certs(out, 2).returncode == 0
    before = contents(out)
    again = make_certs(out, 3)
    assert again.returncode == 0 and "created" in again.stdout and again.stdout.count("kept") == 4
    after = contents(out)
    assert {k: after[k] for k in before} == before
    assert set(after) - set(before) == {"nodes/node-3", "nodes/node-3.pub"}


def test_new_host_is_refused_without_force_and_reissued_with_it(tmp_path):
    out = tmp_path / "c"
    assert make_certs(out, 1).returncode == 0
    before = contents(out)
    refused = make_certs(out, 1, "--host", HOST)
    assert refused.returncode == 1 and f"does not cover DNS:{HOST}" in refused.stderr and "--force" in refused.stderr
    assert contents(out) == before
    forced = make_certs(out, 1, "--host", HOST, "--force")
    assert forced.returncode == 0
    after = contents(out)
    for name in ("ca.crt", "ca.key", "server.pem", "nodes/node-1"):
        assert after[name] != before[name], name
    assert handshake(out, HOST, out / "ca.crt")


def test_bad_arguments_are_reported(tmp_path):
    result = subprocess.run(
        ["bash", str(DEPLOY / "certs.sh"), "--nodes", "many", "--out", str(tmp_path)], capture_output=True, text=True
    )
    assert result.returncode == 2 and "--nodes expects a number" in result.stderr
