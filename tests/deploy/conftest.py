"""Fixtures for the deploy/ tests: the scripts' environment and a process keeper that always cleans up.

Flower's SuperLink and SuperNodes start helpers of their own (SuperExec, then one ServerApp or
ClientApp process per task), some in new sessions, so a process group does not cover them. The
keeper therefore stops every process it started together with all of its descendants, found by
parent pid in /proc just before stopping: SIGTERM, a grace period, then SIGKILL.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
GRACE_SECONDS = 10.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tool_env(flwr_home: Path, **extra: str) -> dict[str, str]:
    """The environment the scripts expect: this venv's executables first, Flower's folder in tmp."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["FLWR_HOME"] = str(flwr_home)
    env.update(extra)
    return env


def _children_by_parent() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def descendants(pid: int) -> list[int]:
    children, found, todo = _children_by_parent(), [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class Processes:
    """Starts commands with their output in a log file; ``stop_all`` ends them and their descendants."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen] = []

    def start(self, command: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
        handle = open(log, "wb")
        proc = subprocess.Popen(
            command,
            stdout=handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=REPO,
            start_new_session=True,
        )
        handle.close()
        self.started.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen) -> None:
        tree = [proc.pid, *descendants(proc.pid)]
        _signal(tree, signal.SIGTERM)
        deadline = time.monotonic() + GRACE_SECONDS
        while time.monotonic() < deadline and any(_alive(pid) for pid in tree):
            proc.poll()  # reap our own child so it does not linger as a zombie
            time.sleep(0.2)
        _signal([pid for pid in tree if _alive(pid)], signal.SIGKILL)
        proc.wait(timeout=GRACE_SECONDS)

    def stop_all(self) -> None:
        for proc in reversed(self.started):
            self.stop(proc)
        self.started.clear()


@pytest.fixture(scope="module")
def processes():
    keeper = Processes()
    yield keeper
    keeper.stop_all()


def wait_for_text(log: Path, text: str, proc: subprocess.Popen, timeout: float) -> None:
    """Wait until ``text`` appears in ``log``; fail early if ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            pytest.fail(
                f"{proc.args[0]} exited ({proc.returncode}) before '{text}':\n{log.read_text(errors='replace')[-3000:]}"
            )
        time.sleep(0.3)
    pytest.fail(f"no '{text}' in {log} after {timeout:.0f} s:\n{log.read_text(errors='replace')[-3000:]}")


def script_options(script: Path) -> dict[str, bool]:
    """The script's options, from its argument `case`: option -> whether it takes a value."""
    options = {}
    for patterns, body in re.findall(r"^\s+([-|\w]+)\)(.*?);;", script.read_text(), re.M):
        for option in patterns.split("|"):
            options[option] = "shift 2" in body
    return options


def make_certs(out: Path, nodes: int, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(DEPLOY / "certs.sh"), "--out", str(out), "--nodes", str(nodes), *extra],
        capture_output=True,
        text=True,
        timeout=60,
    )
