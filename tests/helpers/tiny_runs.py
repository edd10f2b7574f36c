"""The tiny training run the tests start: its arguments for `launch.train`, and torchrun."""

from __future__ import annotations

import sys
from pathlib import Path

TORCHRUN = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node"]


def tiny_run_args(run_dir: Path, dataset: Path, *overrides: str) -> list[str]:
    """configs/tiny.yaml as run `run_dir` on `dataset` at the tests' shape (batches of 4
    sequences of 64 tokens), then `overrides` (key=value)."""
    return [
        "configs/tiny.yaml",
        f"run.dir={run_dir.parent}",
        f"run.name={run_dir.name}",
        f"data.path={dataset}",
        "data.seq_len=64",
        "data.batch_size=4",
        *overrides,
    ]
