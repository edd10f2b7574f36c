"""Benchmarks: GPU speed and memory, reported as ratios to baselines measured in the same run.
They run under launch's CPU wait policy (launch/__init__.py), as training does."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import launch  # noqa: F401  (before torch: the OpenMP wait policy training runs with)

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    """The machine a result was measured on, for its JSON."""
    return f"{platform.node()} ({os.cpu_count()} CPU cores, {platform.processor()})"


def write_result(name: str, result: dict) -> Path:
    """Write `result` to bench/results/<name>_<host>.json and say where."""
    out = RESULTS / f"{name}_{platform.node()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return out


def median_seconds(run: Callable[[], object], repeats: int) -> float:
    """Median wall time of `run` over `repeats` calls, after one warm-up call."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
