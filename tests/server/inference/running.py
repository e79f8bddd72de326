"""A real service on loopback for tests: tiny-llama members, a small Ray, a temporary ledger."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from privtune.common.federation.provenance import DependsOn, record_depends_on
from privtune.common.models import load_model
from privtune.common.offsite import OffsiteConfig, adapter_manifest, adapter_state, save_adapter
from privtune.common.offsite.synthetic import perturbed_adapter
from privtune.common.pmixed import PMixedBudget

MODEL = "tiny-llama"


def make_adapters(folder: Path, n: int = 4, model: str = MODEL) -> list[str]:
    """``n`` LoRA adapters on ``model``, perturbed away from zero so members differ, each recorded as
    depending on one owner's data (``owner-<i>``)."""
    base = load_model(model).model
    cfg = OffsiteConfig(k_bottom=1, k_top=1, n_emulator=2, adapter="lora", lora_r=4, lora_alpha=8)
    folders = []
    for seed in range(n):
        adapted = perturbed_adapter(base, cfg, seed, scale=0.05)
        saved = save_adapter(folder / f"owner-{seed}", adapter_state(adapted), adapter_manifest(adapted))
        record_depends_on(saved, DependsOn((f"owner-{seed}",)))
        folders.append(str(saved))
    return folders


@dataclass
class Running:
    address: str
    service: object
    ledger: Path
    budget: PMixedBudget


@contextmanager
def running_service(
    folder: Path, queries: int, num_replicas: int = 2, q: float = 0.5, **settings: Any
) -> Iterator[Running]:
    """What ``privtune serve --model tiny-llama --adapters ... --port 0`` starts, on a 2-CPU Ray, with its own
    ledger and ledger registry in ``folder``."""
    from privtune.server.inference import cli

    config = cli.ServeConfig(
        model=MODEL,
        adapters=tuple(make_adapters(folder / "adapters")),
        queries=queries,
        q=q,
        epsilon=8.0,
        num_replicas=num_replicas,
        ledger=str(folder / "ledger.sqlite"),
        registry=str(folder / "ledger-registry.json"),
        num_cpus=2,
        port=0,
        **settings,
    )
    started = cli.start(config)
    try:
        yield Running(
            f"127.0.0.1:{started.port}", started.service, folder / "ledger.sqlite", started.service.config.budget
        )
    finally:
        started.stop()
