"""deploy/flower_connection.py: the connection it writes is the one Flower's CLI reads back."""

from __future__ import annotations

import subprocess
import sys

from tests.deploy.conftest import DEPLOY, make_certs, tool_env


def write(tmp_path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(DEPLOY / "flower_connection.py"), *args],
        capture_output=True,
        text=True,
        env=tool_env(tmp_path / "flwr"),
        cwd=tmp_path,
        timeout=60,
    )


def read_back(tmp_path, name: str):
    code = (
        f"import json; from flwr.cli.flower_config import read_superlink_connection as r; c = r({name!r}); "
        "print(json.dumps([c.address, c.root_certificates, c.insecure]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=tool_env(tmp_path / "flwr")
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def test_connection_round_trips_through_flower_with_an_absolute_ca(tmp_path):
    assert make_certs(tmp_path / "certs", 0).returncode == 0
    result = write(tmp_path, "--name", "site", "--address", "10.0.0.5:9092", "--root-certificates", "certs/ca.crt")
    assert result.returncode == 0, result.stderr
    assert read_back(tmp_path, "site") == f'["10.0.0.5:9092", "{tmp_path / "certs" / "ca.crt"}", false]'
    # A second connection leaves the first in place.
    assert (
        write(tmp_path, "--name", "other", "--address", "127.0.0.1:1", "--root-certificates", "certs/ca.crt").returncode
        == 0
    )
    assert read_back(tmp_path, "site").startswith('["10.0.0.5:9092"')


def test_missing_ca_is_refused(tmp_path):
    result = write(tmp_path, "--address", "127.0.0.1:9092", "--root-certificates", "nope.crt")
    assert result.returncode == 2 and "deploy/certs.sh" in result.stderr
    assert not (tmp_path / "flwr" / "config.toml").exists()
