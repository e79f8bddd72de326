"""bench.audit's bookkeeping: a configuration's figures join the others' without replacing them."""

from __future__ import annotations

import json

from bench import audit


def test_a_configuration_s_figures_are_merged_beside_the_others(tmp_path):
    path = tmp_path / "audit.json"
    path.write_text(
        json.dumps(
            {
                "auc": {"non-private": {"plugin": {"loss": {"value": 0.55}}}},
                "seconds": {"non-private": 700.0},
                "settings": {"rounds": 2, "configs": ["non-private"]},
                "command": "python -m bench.audit --configs non-private",
            }
        )
    )
    merged = audit.merged_figures(path, {"pmixed": {"auc": {"pmixed-service": {}}, "queries_spent": 1136}})
    assert merged["auc"] == {"non-private": {"plugin": {"loss": {"value": 0.55}}}, "pmixed": {"pmixed-service": {}}}
    assert merged["seconds"] == {"non-private": 700.0} and merged["queries_spent"] == {"pmixed": 1136}
    assert merged["settings"] == {"non-private": {"rounds": 2, "configs": ["non-private"]}}
    again = audit.merged_figures(path, {"non-private": {"seconds": 10.0}})
    assert again["seconds"] == {"non-private": 10.0}
