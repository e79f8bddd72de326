"""Shared plumbing for benchmarks: timing, peak memory, a printed table and a JSON results file.

Machines here are shared and noisy, so every benchmark reports medians over repeats and ratios
against a baseline measured in the same run; absolute numbers are for orientation only.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine_info() -> dict[str, Any]:
    import torch

    return {
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
    }


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def median_time(
    fn: Callable[[], Any], repeats: int = 5, warmup: int = 1, clock: Callable[[], float] = time.perf_counter
) -> float:
    """Median time of ``fn`` in seconds over ``repeats`` runs after ``warmup`` runs (wall time by default;
    ``time.process_time`` gives this process's CPU time, which other jobs on a shared machine disturb less)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        times.append(clock() - start)
    return statistics.median(times)


def print_table(title: str, header: list[str], rows: list[list[Any]]) -> None:
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(header)]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def running_module(name: str) -> str:
    """The module ``python -m`` ran (a results name need not be its module's), else ``bench.<name>``."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    return spec.name if spec is not None else f"bench.{name}"


def write_results(name: str, figures: dict[str, Any]) -> Path:
    """Write ``bench/results/<name>.json`` with the figures, the machine and the command."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    payload = dict(figures)
    payload["machine"] = machine_info()
    payload["command"] = " ".join(["python -m", running_module(name), *sys.argv[1:]])
    payload["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    print(f"\nwrote {path}")
    return path
