"""A checkpoint written by the code before the package layout changed (launch/ holding the
library; commit PRE_LAYOUT) resumes with today's code: checkpoints hold the config as YAML and
the trainer state as JSON and tensors, never a module path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from io import BytesIO
from pathlib import Path

import pytest
from tiny_runs import tiny_run_args

ROOT = Path(__file__).resolve().parents[2]
PRE_LAYOUT = "4f79a9f"  # the last commit with launch/checkpoint.py, launch/config.py, ...


def _old_tree(destination: Path) -> Path:
    """The packages and configs of PRE_LAYOUT (git archive), or a skip without that history."""
    found = subprocess.run(
        ["git", "cat-file", "-e", f"{PRE_LAYOUT}^{{commit}}"], cwd=ROOT, capture_output=True
    )
    if found.returncode != 0:
        pytest.skip(f"this clone lacks commit {PRE_LAYOUT} (a shallow clone?)")
    paths = ["launch", "evaluation", "model", "kernels", "data", "configs"]
    archive = subprocess.run(
        ["git", "archive", "--format=tar", PRE_LAYOUT, *paths],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(destination, filter="data")
    return destination


def _train(cwd: Path, args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run(
        [sys.executable, "-m", "launch.train", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_a_checkpoint_of_the_old_layout_resumes(stdlib_dataset, tmp_path):
    old = _old_tree(tmp_path / "old")
    where = subprocess.run(
        [
            sys.executable,
            "-c",
            "import launch.train, training.checkpoint; print(launch.train.__file__)",
        ],
        cwd=old,
        env={**os.environ, "PYTHONPATH": str(old)},
        capture_output=True,
        text=True,
        check=True,
    )
    assert Path(where.stdout.strip()).is_relative_to(old)  # the old code, not today's
    run_dir = tmp_path / "runs" / "old"
    args = tiny_run_args(
        run_dir,
        stdlib_dataset,
        "train.checkpoint_every=2",
        "train.log_every=1",
        "train.warmup_steps=2",
        "eval.every_checkpoint=false",
    )
    done = _train(old, [*args, "train.max_steps=4"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert (run_dir / "checkpoints" / "step_4").is_dir()

    done = _train(ROOT, [*args, "train.max_steps=6"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stderr and "(step 4)" in done.stderr, done.stderr[-3000:]
    assert (run_dir / "checkpoints" / "step_6").is_dir()
    steps = [json.loads(line).get("step") for line in (run_dir / "metrics.jsonl").open()]
    assert steps[-1] == 6 and 4 in steps
