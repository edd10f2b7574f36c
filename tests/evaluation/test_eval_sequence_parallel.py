"""Sequence-parallel evaluation (each window split over a group of ranks through the model's
Ulysses path, evaluation/extrapolation.py) against the same evaluation on one rank."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import EVAL_ARGS, ROOT

from launch import evaluate

WORKER = "tests/helpers/sequence_parallel_eval_worker.py"
TORCHRUN = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node"]
SCHEMES = ["alibi", "hybrid", "path_alibi", "rope"]


def test_two_ranks_evaluate_as_one(stdlib_dataset, tmp_path):
    """One start-up of 2 gloo ranks for the 4 schemes: perplexity (all positions and beyond the
    trained length) within 1e-6 relative at lengths 32, 63 (odd: padded to split) and 256,
    passkey retrieval at 256 the same, and the diagnostics (windows dealt whole) the same."""
    out = tmp_path / "sp_eval.json"
    done = subprocess.run(
        [*TORCHRUN, "2", WORKER, str(out), str(stdlib_dataset), *SCHEMES],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert sorted(report) == SCHEMES
    for scheme, found in report.items():
        split, whole = found["split"], found["whole"]
        assert found["calls"] > 0, scheme  # the windows ran split over the 2 ranks
        assert whole["skipped"] == {} and split["skipped"] == {}, scheme
        assert set(whole["ppl"]) == {"32", "63", "256"} and split["windows"] == whole["windows"]
        for key in ("ppl", "ppl_beyond"):
            assert split[key].keys() == whole[key].keys()
            for length, value in whole[key].items():
                assert split[key][length] == pytest.approx(value, rel=1e-6), (scheme, key)
        assert split["passkey"] == whole["passkey"], scheme
        for length, value in whole["passkey_nll"]["256"].items():
            assert split["passkey_nll"]["256"][length] == pytest.approx(value, rel=1e-5)
        assert split["mixing_window"] == whole["mixing_window"], scheme
        if scheme != "path_alibi":  # PaTH has no diagnostics
            entropy = (split["entropy"]["63"], whole["entropy"]["63"])
            np.testing.assert_allclose(*entropy, rtol=1e-5)


def test_launch_evaluate_splits_windows_over_torchrun_ranks(trained_run, tmp_path, capsys):
    """`torchrun --nproc_per_node 2 -m launch.evaluate RUN --sequence-parallel 2` gives the
    numbers the 2-rank training's own evaluation recorded (ranks dealt whole windows there);
    one process asking for 2 is a one-line error."""
    out = tmp_path / "split"
    done = subprocess.run(
        [*TORCHRUN, "2", "-m", "launch.evaluate", str(trained_run), "--step", "4", "--out",
         str(out), "--sequence-parallel", "2", *EVAL_ARGS],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    split = json.loads((out / "eval" / "step_4.json").read_text())
    inside = json.loads((trained_run / "eval" / "step_4.json").read_text())
    for key in ("ppl", "ppl_beyond"):
        assert split[key] == pytest.approx(inside[key], rel=1e-6), key
    for key in ("windows", "passkey", "mixing_window"):
        assert split[key] == inside[key], key
    assert evaluate.main([str(trained_run), "--sequence-parallel", "2"]) == 2
    error = capsys.readouterr().err
    assert "--sequence-parallel 2 must be at least 1 and divide the 1 ranks" in error
