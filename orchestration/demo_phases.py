"""Wall time of each phase of ``privtune demo``, printed as each one ends and summed up at the end.

A first run builds cached artifacts (the ULT demo model, SmolLM2's safetensors, the LDP geometry)
and a second one only loads them: the summary tells a user which of the two they just waited for,
and where the minutes went.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class PhaseClock:
    phases: list[tuple[str, float]] = field(default_factory=list)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - start
            self.phases.append((name, seconds))
            print(f"[demo] {name}: {format_seconds(seconds)}", flush=True)

    @property
    def total(self) -> float:
        return sum(seconds for _, seconds in self.phases)

    def summary(self) -> str:
        width = max((len(name) for name, _ in self.phases), default=0)
        lines = [f"  {name:<{width}}  {format_seconds(seconds):>8}" for name, seconds in self.phases]
        return "\n".join(["phase timings (wall):", *lines, f"  {'total':<{width}}  {format_seconds(self.total):>8}"])

    def markdown(self) -> list[str]:
        rows = [f"| {name} | {format_seconds(seconds)} |" for name, seconds in self.phases]
        return [
            "## Phase timings (wall)",
            "",
            "| phase | time |",
            "|---|---|",
            *rows,
            f"| total | {format_seconds(self.total)} |",
            "",
        ]


def format_seconds(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s" if minutes else f"{seconds:.1f} s"
