"""The model owner's Flower ServerApp (``flwr run .`` points here via pyproject.toml)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from privtune.common.federation.config import FederationConfig
from privtune.server.federation import run_federation


def build_app(overrides: Mapping[str, Any] | None = None) -> ServerApp:
    """A ServerApp whose run config is Flower's, updated with ``overrides`` (``privtune simulate``)."""
    overrides = dict(overrides or {})
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = FederationConfig.from_run_config({**dict(context.run_config), **overrides})
        run_federation(grid, cfg)

    return server_app


app = build_app()
