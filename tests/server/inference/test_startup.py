"""Starting the service fails fast and clearly when replicas cannot be placed or cannot load."""

from __future__ import annotations

import pytest

from privtune.common.errors import PrivtuneError
from privtune.common.pmixed import PMixedBudget
from privtune.server.inference.members import ServedModel
from privtune.server.inference.service import PMixedService, ServiceConfig
from tests.server.inference.running import make_adapters

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def small_ray():
    import ray

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, namespace="privtune-tests")
    yield
    ray.shutdown()


def test_start_errors(small_ray, tmp_path):
    budget = PMixedBudget(8.0, 1e-5, 3, T=4, q=0.5, n_members=1)
    foreign = make_adapters(tmp_path / "gpt2", n=1, model="tiny-gpt2")  # another family than the served model
    served, ledger, registry = (
        ServedModel("tiny-llama", tuple(foreign)),
        str(tmp_path / "l.sqlite"),
        str(tmp_path / "r"),
    )
    config = ServiceConfig(served, budget, ledger, registry=registry)
    with pytest.raises(PrivtuneError, match="a replica failed to start: adapter refused: it was trained for a gpt2"):
        PMixedService(config)
    too_many = ServiceConfig(served, budget, ledger, 2, registry=registry)
    with pytest.raises(PrivtuneError, match="need more than the Ray cluster's 1 CPUs"):
        PMixedService(too_many)
