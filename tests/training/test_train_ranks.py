"""ZeRO-3 across ranks and non-finite steps, on fixed synthetic batches (no dataset needed)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FIXED = str(ROOT / "tests" / "helpers" / "train_on_fixed_batches.py")
BIN = Path(sys.executable).parent


def _run(cmd: list[str], run_dir: Path, *args: str) -> subprocess.CompletedProcess:
    overrides = [
        f"run.dir={run_dir.parent}",
        f"run.name={run_dir.name}",
        "train.log_every=1",
        "train.warmup_steps=2",
        "eval.every_checkpoint=false",
        *args,
    ]
    return subprocess.run(
        [*cmd, "configs/tiny.yaml", *overrides],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def _losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_two_ranks_of_zero3_equal_one_rank_with_the_same_global_batch(tmp_path):
    """deepspeed --num_gpus 2 (two CPU processes over gloo) against one process."""
    common = ["train.max_steps=6", "train.checkpoint_every=3"]
    one = _run([sys.executable, FIXED, "8"], tmp_path / "one", "data.batch_size=8", *common)
    assert one.returncode == 0, one.stderr[-3000:]
    launcher = [str(BIN / "deepspeed"), "--num_gpus", "2", FIXED, "8"]
    two = _run(launcher, tmp_path / "two", "data.batch_size=4", *common)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert list(a) == list(b) == [1, 2, 3, 4, 5, 6]
    assert a[6] < a[1] - 1.0  # it learns
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5), step
    # Both ranks wrote their share of every checkpoint.
    saved = sorted(p.name for p in (tmp_path / "two" / "checkpoints" / "step_6").iterdir())
    assert {"trainer_rank_0.pt", "trainer_rank_1.pt", "rotalibi.json"} <= set(saved)
    assert sum(name.endswith("optim_states.pt") for name in saved) == 2


def test_non_finite_steps_are_skipped_then_too_many_stop_the_run(tmp_path):
    common = ["train.max_steps=10", "train.checkpoint_every=4", "train.max_bad_steps=3"]
    cmd = [sys.executable, FIXED, "4"]
    survived = _run(cmd, tmp_path / "survives", "data.batch_size=4", "nan_steps=5,6", *common)
    assert survived.returncode == 0, survived.stderr[-3000:]
    records = [json.loads(x) for x in (tmp_path / "survives" / "metrics.jsonl").open()]
    by_step = {r["step"]: r for r in records}
    assert by_step[10]["skipped_steps"] == 2
    assert all(math.isfinite(by_step[s]["loss"]) for s in (4, 7, 10))
    assert by_step[10]["loss"] < by_step[4]["loss"]  # the skipped steps did not corrupt it

    died = _run(cmd, tmp_path / "dies", "data.batch_size=4", "nan_steps=6,7,8", *common)
    assert died.returncode == 3, died.stderr[-3000:]
    assert "3 non-finite steps in a row" in died.stderr
    assert f"{tmp_path / 'dies' / 'checkpoints' / 'step_4'}" in died.stderr
    saved = sorted(p.name for p in (tmp_path / "dies" / "checkpoints").glob("step_*"))
    assert saved == ["step_4"]
