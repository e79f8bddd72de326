import tomllib
from pathlib import Path

import pytest

from privtune.common.errors import PrivtuneError
from privtune.common.federation.config import FederationConfig

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def test_pyproject_run_config_equals_the_dataclass_defaults():
    flwr = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]
    assert flwr["components"] == {"serverapp": "privtune.server.app:app", "clientapp": "privtune.client.app:app"}
    assert FederationConfig.from_run_config(flwr["config"]) == FederationConfig()
    assert set(flwr["config"]) == set(FederationConfig().to_run_config())


def test_bad_run_config_is_named():
    with pytest.raises(PrivtuneError, match="unknown run-config key 'roundz'"):
        FederationConfig.from_run_config({"roundz": 3})
    with pytest.raises(PrivtuneError, match="must be int"):
        FederationConfig.from_run_config({"num-server-rounds": "many"})
    with pytest.raises(PrivtuneError, match="strategy must be one of"):
        FederationConfig.from_run_config({"strategy": "fedsgd"})
