"""Tiny models of each family, a few random token blocks, and a model comparison helper."""

from __future__ import annotations

import pytest
import torch

from privtune.common.models import TinySpec, tiny_model

FAMILIES = ("gpt2", "llama", "opt")


def tiny(family: str, seed: int = 0, n_layers: int = 6) -> torch.nn.Module:
    return tiny_model(family, spec=TinySpec(n_layers=n_layers, hidden=32, heads=4, max_positions=64), seed=seed)


def token_blocks(n: int = 16, length: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 259, (n, length), generator=torch.Generator().manual_seed(seed))


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(autouse=True, scope="package")
def one_thread():
    """Tiny models: thread hand-offs cost more than the maths, and much more on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
