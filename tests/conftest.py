"""Shared fixtures. Real components throughout: tiny models are real transformers models with
random weights; the corpus is the real embedded corpus (downloaded once into the user cache)."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny models (``pytestmark = pytest.mark.usefixtures("one_thread")``): their ops take
    microseconds, so a thread pool only adds synchronisation, which on a busy shared machine costs
    milliseconds per op (a 32-wide linear took 6 ms with 2 threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def smollm2():
    from privtune.common.models import load_model

    return load_model("smollm2")


@pytest.fixture(scope="session")
def shakespeare():
    from privtune.common.corpus import shakespeare_works

    return shakespeare_works()
