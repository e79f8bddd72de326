"""Where a data owner's ledger lives is the site's choice, never the model owner's run config."""

import pytest

from privtune.client.site import SiteConfig
from privtune.common.errors import PrivtuneError
from privtune.common.federation.config import FederationConfig

HOSTILE = FederationConfig(run_dir="/tmp/fresh-budget-every-run")


def test_a_real_site_without_a_workspace_is_refused_rather_than_placed_by_the_run_config(tmp_path):
    with pytest.raises(PrivtuneError, match="no workspace in the node config"):
        SiteConfig.from_node_config({"data-path": str(tmp_path), "owner": "acme"}, HOSTILE)
    site = SiteConfig.from_node_config({"workspace": str(tmp_path / "ws"), "owner": "acme"}, HOSTILE)
    assert site.ledger_path == tmp_path / "ws" / "ledger.sqlite"


def test_a_virtual_node_of_a_simulation_keeps_its_run_folder_default():
    site = SiteConfig.from_node_config({"partition-id": 2, "num-partitions": 4}, HOSTILE)
    assert str(site.workspace) == "/tmp/fresh-budget-every-run/owners/owner-2"
