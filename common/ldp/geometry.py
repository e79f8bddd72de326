"""Geometric facts of an embedding space that the guarantees and CusText need, cached by digest.

Both depend only on the public embedding, never on the text perturbed: a guarantee computed from
the document's own tokens (the diameter of the tokens used, say) would itself leak the document.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from privtune.common.errors import PrivtuneError
from privtune.common.ldp.embedding import EmbeddingSpace
from privtune.common.paths import cache_dir

DIAMETER_VERSION = 2  # version 1 holds diameters from a pruning that could miss the largest pair
PARTITION_VERSION = 1
BYTES_PER_FLOAT64 = 8


def diameter_bound(space: EmbeddingSpace, memory_cap_bytes: int = 256 << 20) -> float:
    """An upper bound on the largest distance between two rows, exact up to ``space.rounding_bound``.

    Cached per embedding digest (computing it for 49k x 576 takes well under a second when the
    pruning below works, and ~30 s when it cannot, e.g. for a random Gaussian matrix).
    """
    path = cache_path(space, "diameter", DIAMETER_VERSION, "json")
    if path.exists():
        return float(json.loads(path.read_text())["diameter_bound"])
    start = time.perf_counter()
    largest = largest_distance(space, memory_cap_bytes)
    figures = {
        "diameter_bound": largest + space.rounding_bound,
        "largest_computed_distance": largest,
        "rounding_bound": space.rounding_bound,
        "rows": space.size,
        "dim": space.dim,
        "seconds": time.perf_counter() - start,
    }
    write_atomically(path, json.dumps(figures, indent=2).encode())
    return figures["diameter_bound"]


def largest_distance(space: EmbeddingSpace, memory_cap_bytes: int) -> float:
    """Largest computed pairwise distance, pruned by radius so that only candidate pairs are computed.

    With rows sorted by distance r from the centroid, a pair farther apart than the best distance
    L found so far needs r_a + r_b > L (triangle inequality through the centroid). A double sweep
    (farthest point from the farthest point) gives a good L first; each row a then only needs the
    rows with r_b >= L - r_a, a prefix of the sorted order, and once r_a + r_max < L no later row can
    be in a better pair. A block of rows is searched against the prefix its LARGEST radius needs
    (the first row of the block), which holds the prefixes of all its rows. A margin of a few
    rounding bounds keeps the pruning exact for computed distances.
    """
    radii, order = space.sq_norms.sqrt().sort(descending=True)
    r_max = float(radii[0])
    margin = 4.0 * space.rounding_bound + 1e-12 * max(r_max, 1.0)
    far = int(space.distances(order[:1]).argmax())
    best = float(space.distances(torch.tensor([far])).max())
    block = max(1, memory_cap_bytes // (space.size * BYTES_PER_FLOAT64))
    ascending = radii.flip(0)
    for start in range(0, space.size, block):
        if float(radii[start]) + r_max < best - margin:
            break
        threshold = best - float(radii[start]) - margin
        partners = space.size - int(torch.searchsorted(ascending, torch.tensor([threshold], dtype=ascending.dtype)))
        rows = order[start : start + block]
        dist = space.distances(rows, order[: max(partners, 1)])
        best = max(best, float(dist.max()))
    return best


def custext_partition(space: EmbeddingSpace, top_k: int, memory_cap_bytes: int = 256 << 20) -> torch.Tensor:
    """Cell index of every row, for CusText's shared output sets (cached per digest and k).

    The construction follows CusText's (Chen et al., ACL Findings 2023) mapping that shares output
    sets: take the smallest unassigned token id, make it and its k-1 nearest unassigned tokens one
    cell, repeat until fewer than 2k tokens are left; those form the last cell. So every cell has
    between k and 2k-1 members and no token is alone in its cell (which would emit it unchanged).
    Token-id order is public, so the partition depends on the embedding only.
    """
    if top_k < 2 or top_k > space.size:
        raise PrivtuneError(f"CusText top-k must be between 2 and the vocabulary size {space.size}, got {top_k}")
    path = cache_path(space, f"custext-k{top_k}", PARTITION_VERSION, "pt")
    if path.exists():
        return torch.load(path)
    cells = greedy_cells(space.points.to(torch.float32), top_k, memory_cap_bytes)
    buffer = io.BytesIO()
    torch.save(cells, buffer)
    write_atomically(path, buffer.getvalue())
    return cells


def greedy_cells(points: torch.Tensor, top_k: int, memory_cap_bytes: int) -> torch.Tensor:
    """Greedy nearest-neighbour cells; float32 suffices here (the partition is structure, not a guarantee).

    The seeds are the smallest unassigned ids, so the next seeds are known in advance up to those
    that get assigned first: distances of a block of upcoming candidate seeds to all remaining rows
    come from one matrix product, and the sequential part is only a masked top-k per seed. The
    result is exactly that of the one-seed-at-a-time greedy. Rows are compacted once half of the
    working set is assigned.
    """
    n = points.shape[0]
    cells = torch.full((n,), -1, dtype=torch.long)
    remaining = torch.arange(n)
    work = points
    sq = (work * work).sum(dim=1)
    assigned = torch.zeros(n, dtype=torch.bool)
    free, cell = n, 0
    while free >= 2 * top_k:
        if int(assigned.sum()) * 2 > len(remaining):
            keep = ~assigned
            remaining, work, sq, assigned = remaining[keep], work[keep], sq[keep], assigned[keep]
        block = max(1, memory_cap_bytes // (4 * len(remaining)))
        seeds = (~assigned).nonzero().squeeze(1)[:block]
        dist = torch.addmm(sq[seeds, None] + sq[None, :], work[seeds], work.T, beta=1.0, alpha=-2.0)
        for row, seed in zip(dist, seeds.tolist()):
            if free < 2 * top_k:
                break
            if assigned[seed]:
                continue
            row = torch.where(assigned, float("inf"), row)
            row[seed] = -1.0
            members = row.topk(top_k, largest=False).indices
            assigned[members] = True
            cells[remaining[members]] = cell
            cell += 1
            free -= top_k
    cells[cells < 0] = cell
    return cells


def cache_path(space: EmbeddingSpace, what: str, version: int, suffix: str) -> Path:
    """Where a fact of this embedding (keyed by its digest) is cached."""
    return cache_dir("ldp") / f"{what}-v{version}-{space.digest[:24]}.{suffix}"


def write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` in one step, so a concurrent reader never sees half a cache file."""
    fd, staging = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(staging, path)
