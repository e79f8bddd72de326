"""The deploy/ shell scripts: valid bash, executable, and --help documents every option they parse."""

from __future__ import annotations

import subprocess

import pytest

from tests.deploy.conftest import DEPLOY, script_options


@pytest.mark.parametrize("script", ["certs.sh", "superlink.sh", "supernode.sh"])
def test_script_parses_and_documents_every_option(script):
    path = DEPLOY / script
    assert path.stat().st_mode & 0o111, f"{script} is not executable"
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    usage = subprocess.run(["bash", str(path), "--help"], capture_output=True, text=True)
    assert usage.returncode == 0, usage.stderr
    options = [o for o in script_options(path) if o.startswith("--") and o != "--help"]
    assert len(options) >= 4
    for option in options:
        assert option in usage.stdout, f"{script} --help does not mention {option}"


@pytest.mark.parametrize("script", ["superlink.sh", "supernode.sh"])
def test_unknown_option_is_an_error(script):
    result = subprocess.run(["bash", str(DEPLOY / script), "--no-such-option"], capture_output=True, text=True)
    assert result.returncode == 2 and "--no-such-option" in result.stderr


def test_supernode_refuses_missing_inputs_with_a_fix(tmp_path):
    key = tmp_path / "node-1"
    key.write_text("not a key")
    cases = {
        (): "--key is required",
        ("--key", str(tmp_path / "absent")): "does not exist",
        ("--key", str(key)): "--data is required",
        (
            "--key",
            str(key),
            "--data",
            str(tmp_path),
            "--ca",
            str(tmp_path / "ca.crt"),
        ): "ask the model owner for ca.crt",
    }
    for args, message in cases.items():
        result = subprocess.run(["bash", str(DEPLOY / "supernode.sh"), *args], capture_output=True, text=True)
        assert result.returncode == 1 and message in result.stderr, (args, result.stderr)
