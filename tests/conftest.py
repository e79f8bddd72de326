"""Shared fixtures. Real components throughout: tiny models are real transformers models with
random weights; the corpus is the real embedded corpus (downloaded once into the user cache)."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def smollm2():
    from privtune.common.models import load_model

    return load_model("smollm2")


@pytest.fixture(scope="session")
def shakespeare():
    from privtune.common.corpus import shakespeare_works

    return shakespeare_works()
