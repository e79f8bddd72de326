"""The pruned diameter search against brute force on many random point clouds."""

import numpy as np
import pytest
import torch
from scipy.spatial.distance import pdist

from bench.privacy_checks import random_cloud
from privtune.common.ldp import EmbeddingSpace, load_embedding
from privtune.common.ldp.geometry import BYTES_PER_FLOAT64, largest_distance

CLOUDS = 3000


class IdTokenizer:
    pad_token_id = bos_token_id = eos_token_id = 0

    def __init__(self, vocab_size):
        self.vocab_size = vocab_size


def test_pruned_diameter_never_misses_on_random_clouds():
    """Zero misses: the result is the brute-force largest distance to within the space's rounding bound."""
    rng = np.random.default_rng(13)
    misses = []
    for cloud in range(CLOUDS):
        points = random_cloud(rng)
        space = EmbeddingSpace.from_matrix(torch.tensor(points), IdTokenizer(len(points)), name=f"cloud-{cloud}")
        rows_per_block = int(rng.integers(1, len(points) + 1))
        found = largest_distance(space, memory_cap_bytes=rows_per_block * len(points) * BYTES_PER_FLOAT64)
        exact = pdist(points).max()
        if found + space.rounding_bound < exact or found > exact + space.rounding_bound:
            misses.append((cloud, found, exact))
    assert misses == []


def test_tiny_embedding_diameter_is_exact():
    space = load_embedding("tiny")
    exact = pdist(space.points.numpy()).max()
    assert abs(largest_distance(space, memory_cap_bytes=1 << 16) - exact) <= space.rounding_bound


@pytest.mark.parametrize("rows_per_block", [1, 7, 3000])
def test_pruned_diameter_equals_brute_force_on_a_larger_space(rows_per_block):
    rng = np.random.default_rng(3)
    # radii spread like real embeddings (so pruning engages)
    matrix = rng.normal(size=(3000, 16)) * rng.uniform(0.2, 1.0, size=(3000, 1))
    space = EmbeddingSpace.from_matrix(torch.tensor(matrix), IdTokenizer(3000), name="spread")
    exact = pdist(matrix).max()
    found = largest_distance(space, memory_cap_bytes=rows_per_block * 3000 * BYTES_PER_FLOAT64)
    assert abs(found - exact) <= space.rounding_bound
