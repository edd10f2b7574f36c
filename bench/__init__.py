"""Benchmarks: GPU speed and memory, reported as ratios to baselines measured in the same run.
They run under launch's CPU wait policy (launch/__init__.py), as training does."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import launch  # noqa: F401  (before torch: the OpenMP wait policy training runs with)


def median_seconds(run: Callable[[], object], repeats: int) -> float:
    """Median wall time of `run` over `repeats` calls, after one warm-up call."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
