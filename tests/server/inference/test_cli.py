"""``privtune serve`` arguments -> the service configuration (the running service is in test_service)."""

from __future__ import annotations

import argparse

import pytest

from privtune.common.errors import PrivtuneError
from privtune.server.inference import cli
from tests.server.inference.running import MODEL, make_adapters


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.configure(parser)
    return parser.parse_args(argv)


def test_arguments_make_the_budget_and_ledger(tmp_path):
    adapters = make_adapters(tmp_path / "a", n=2)
    args = parse(
        [
            "--model",
            MODEL,
            "--adapters",
            *adapters,
            "--epsilon",
            "6",
            "--queries",
            "12",
            "--q",
            "0.25",
            "--num-replicas",
            "3",
            "--ledger",
            str(tmp_path / "l.sqlite"),
        ]
    )
    config = cli.service_config(args)
    assert config.budget.n_members == 2 and config.budget.T == 12 and config.budget.q == 0.25
    assert config.budget.epsilon == 6 and config.budget.alpha == 3 and config.num_replicas == 3
    assert config.ledger == str(tmp_path / "l.sqlite")
    run_args = parse(["--run", str(tmp_path / "run")])
    assert cli.ledger_path(run_args) == tmp_path / "run" / cli.DEFAULT_LEDGER_NAME
    with pytest.raises(PrivtuneError, match="num-replicas"):
        cli.service_config(parse(["--model", MODEL, "--adapters", *adapters, "--num-replicas", "0"]))
    with pytest.raises(PrivtuneError, match="subsampling rate"):
        cli.service_config(parse(["--model", MODEL, "--adapters", *adapters, "--q", "1.5"]))
