"""``privtune serve`` arguments -> ServeConfig -> the service configuration (the running service is in test_service)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from privtune.common.errors import PrivtuneError
from privtune.common.pmixed import PMixedBudget, best_budget
from privtune.server.inference import cli
from privtune.server.inference.members import ServedModel
from tests.server.inference.running import MODEL, make_adapters


def parse(argv: list[str]) -> cli.ServeConfig:
    parser = argparse.ArgumentParser()
    cli.configure(parser)
    return cli.ServeConfig.from_args(parser.parse_args(argv))


def test_arguments_make_the_typed_config_budget_and_ledger(tmp_path):
    adapters = make_adapters(tmp_path / "a", n=2)
    argv = ["--model", MODEL, "--adapters", *adapters, "--epsilon", "6", "--queries", "12", "--q", "0.25"]
    config = parse([*argv, "--num-replicas", "3", "--ledger", str(tmp_path / "l.sqlite"), "--port", "0"])
    assert config == cli.ServeConfig(
        model=MODEL,
        adapters=tuple(adapters),
        epsilon=6.0,
        queries=12,
        q=0.25,
        num_replicas=3,
        ledger=str(tmp_path / "l.sqlite"),
        port=0,
    )
    assert parse(["--model", MODEL]) == cli.ServeConfig(model=MODEL)  # the CLI's defaults are the config's
    service = cli.service_config(config)
    assert service.budget.n_members == 2 and service.budget.T == 12 and service.budget.q == 0.25
    assert service.budget.epsilon == 6 and service.budget.projection == "box" and service.num_replicas == 3
    assert service.budget == best_budget(6.0, 1e-5, 12, 0.25, 2, "box", 0.85)  # the order of widest box
    assert service.ledger == str(tmp_path / "l.sqlite")
    with pytest.raises(PrivtuneError, match="num-replicas"):
        cli.service_config(parse(["--model", MODEL, "--adapters", *adapters, "--num-replicas", "0"]))
    with pytest.raises(PrivtuneError, match="subsampling rate"):
        cli.service_config(parse(["--model", MODEL, "--adapters", *adapters, "--q", "1.5"]))


def test_the_projection_its_split_order_and_default_rate_reach_the_budget(tmp_path):
    adapters = make_adapters(tmp_path / "a", n=2)
    base = ["--model", MODEL, "--adapters", *adapters]
    box = cli.service_config(parse([*base, "--split", "0.7", "--alpha", "5"])).budget
    assert box == PMixedBudget(8.0, 1e-5, 5, 1024, 1.0, 2, "box", 0.7)  # q = 1: every member, every query
    renyi = cli.service_config(parse([*base, "--projection", "renyi", "--alpha", "3"])).budget
    assert renyi == PMixedBudget(8.0, 1e-5, 3, 1024, 0.03, 2, "renyi", cli.DEFAULTS.split)  # split: box only
    assert cli.service_config(parse([*base, "--projection", "renyi"])).budget.projection == "renyi"
    with pytest.raises(PrivtuneError, match="split"):
        cli.service_config(parse([*base, "--split", "1"]))
    with pytest.raises(PrivtuneError, match=r"q must be in \(0, 1\)"):
        cli.service_config(parse([*base, "--projection", "renyi", "--q", "1"]))
    with pytest.raises(SystemExit):
        parse([*base, "--projection", "ball"])


@pytest.mark.parametrize("flag", ["--epsilon", "--delta", "--q", "--split", "--cpus-per-replica"])
def test_non_finite_numbers_are_refused(flag):
    for value in ("inf", "nan"):
        with pytest.raises(SystemExit):
            parse(["--model", MODEL, flag, value])


def test_a_run_and_its_out_folder_have_one_default_ledger(tmp_path):
    out = tmp_path / "out"
    members = ServedModel(MODEL, (str(out / "server" / "adapters" / "owner-0"),))
    from_out = cli.ledger_path(cli.ServeConfig(run=str(out)), members)
    from_run = cli.ledger_path(cli.ServeConfig(run=str(out / "server")), members)
    assert from_out == from_run == (out / "server" / cli.DEFAULT_LEDGER_NAME).resolve()
    assert cli.ledger_path(cli.ServeConfig(run=str(out), ledger=str(tmp_path / "x")), members) == Path(tmp_path / "x")


def test_replicas_ask_ray_for_gpus_only_on_cuda(tmp_path):
    from privtune.server.inference.service import replica_resources

    adapters = make_adapters(tmp_path / "a", n=2)
    argv = ["--model", MODEL, "--adapters", *adapters, "--num-replicas", "2", "--cpus-per-replica", "2"]
    assert parse(argv) == cli.ServeConfig(
        model=MODEL, adapters=tuple(adapters), num_replicas=2, cpus_per_replica=2.0, device="auto"
    )
    cpu_only, one_gpu = {"CPU": 8.0}, {"CPU": 8.0, "GPU": 1.0}
    auto = cli.service_config(parse([*argv, "--gpus-per-replica", "0.5"]))
    assert replica_resources(auto, cpu_only) == {"num_cpus": 2.0, "num_gpus": 0.0}
    assert replica_resources(auto, one_gpu) == {"num_cpus": 2.0, "num_gpus": 0.5}
    assert replica_resources(cli.service_config(parse([*argv, "--device", "cpu"])), one_gpu)["num_gpus"] == 0.0
    cuda = cli.service_config(parse([*argv, "--device", "cuda"]))
    with pytest.raises(PrivtuneError, match="2 replica\\(s\\) x 1 GPU need more than the Ray cluster's 1 GPUs"):
        replica_resources(cuda, one_gpu)
    with pytest.raises(PrivtuneError, match="gpus-per-replica must be in"):
        cli.service_config(parse([*argv, "--gpus-per-replica", "0"]))
    with pytest.raises(SystemExit):
        parse([*argv, "--device", "cuda:1"])  # Ray assigns each replica its GPU
