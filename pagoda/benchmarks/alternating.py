"""Two or more ways of running the same engine step, alternated in one process: on a machine whose
speed drifts from minute to minute (the 2-core VM moves +-30 %), only pairs measured side by side
compare. Each round runs every way in turn (reversed every other round), a step to settle after
each switch and then `steps` timed steps; a way's figure is the median of its rounds' medians."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def alternate(
    step: Callable[[], object], ways: dict[str, Callable[[], None]], rounds: int, steps: int
) -> dict[str, list[float]]:
    """{way: each round's median step in ms}; `ways` maps a name to the switch that selects it."""
    medians: dict[str, list[float]] = {name: [] for name in ways}
    for r in range(rounds):
        for name in (list(ways) if r % 2 == 0 else list(reversed(ways))):
            ways[name]()
            step()
            times = []
            for _ in range(steps):
                started = time.perf_counter()
                step()
                times.append(time.perf_counter() - started)
            medians[name].append(statistics.median(times) * 1e3)
    return medians


def print_rounds(title: str, medians: dict[str, list[float]]) -> None:
    print(f"{title}: median of each round")
    width = max(map(len, medians))
    for name, values in medians.items():
        print(f"{name:<{width}}  median {statistics.median(values):6.2f}   " + " ".join(f"{v:.1f}" for v in values))
