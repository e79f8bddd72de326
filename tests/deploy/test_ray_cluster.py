"""deploy/ray/cluster.yaml passes the checks `ray up` runs (Ray's own prepare_config and schema) and
starts the Ray client server on the port the README's `privtune serve --address ray://...` uses."""

from __future__ import annotations

import re

import yaml

from tests.deploy.conftest import DEPLOY

CLUSTER = DEPLOY / "ray" / "cluster.yaml"


def test_cluster_config_is_what_ray_up_accepts():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(CLUSTER.read_text())
    prepared = prepare_config(config)
    validate_config(prepared)
    assert prepared["provider"]["type"] == "local"
    workers = config["provider"]["worker_ips"]
    node_type = prepared["available_node_types"][prepared["head_node_type"]]
    assert node_type["min_workers"] == node_type["max_workers"] == len(workers)


def test_head_and_workers_use_the_pinned_ray_and_agree_on_ports():
    config = yaml.safe_load(CLUSTER.read_text())
    head = " ".join(config["head_start_ray_commands"])
    workers = " ".join(config["worker_start_ray_commands"])
    gcs = re.search(r"--head --port=(\d+)", head).group(1)
    assert f"--address=$RAY_HEAD_IP:{gcs}" in workers
    client_port = re.search(r"--ray-client-server-port=(\d+)", head).group(1)
    assert f"ray://HEAD_IP:{client_port}" in CLUSTER.read_text()
    for command in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        assert "~/privtune/.venv/bin/ray " in command  # the venv `make setup` made, same Ray everywhere
    assert any("make setup" in c for c in config["setup_commands"])


def test_keys_and_environments_are_not_copied_to_the_cluster():
    config = yaml.safe_load(CLUSTER.read_text())
    assert {"deploy/certs", "deploy/k8s/certs", ".venv", "runs"} <= set(config["rsync_exclude"])
