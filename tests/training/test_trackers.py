"""training.metrics' sinks on their own: W&B (offline) and MLflow (file store) continue the same
run across a resume and get each value once; a tracker added at a resume gets the history;
a tracker that is not installed is a config error; a tracker that fails mid-run is dropped
with a warning and the run goes on (a real run whose MLflow store turns read-only)."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import pytest
from matplotlib import pyplot as plt
from tiny_runs import tiny_run_args
from tracker_records import mlflow_history, wandb_history

from training.config import ConfigError, load_config
from training.metrics import MetricsLogger, mlflow_tracking_uri

ROOT = Path(__file__).resolve().parents[2]

CONFIG = {"run": {"name": "tracked", "dir": "unused"}, "train": {"lr": 0.1}}


@pytest.fixture
def trackers_env(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    return tmp_path


def _logger(run_dir, loggers, start_step):
    config = {**CONFIG, "run": {"name": "tracked", "dir": str(run_dir.parent)}}
    return MetricsLogger(
        run_dir, config, loggers=loggers, project="test", start_step=start_step, max_steps=9
    )


def test_a_resumed_run_continues_its_trackers_and_sends_each_value_once(trackers_env):
    """Run 1 logs steps 1-5 and dies; its checkpoint is step 3. Run 2 resumes there, runs
    step 3's owed evaluation, then logs steps 4-6 again (other timings, here other values).
    metrics.jsonl holds run 2's records after step 3; W&B and MLflow hold each (step, key)
    once, in one run each: run 1's for steps 4 and 5, which they had."""
    run_dir = trackers_env / "tracked"
    everything = ["tensorboard", "jsonl", "wandb", "mlflow"]
    first = _logger(run_dir, everything, start_step=0)
    for step in range(1, 6):
        first.log({"step": step, "loss": 1.0 / step, "mfu": None})
    first.close(1)
    ids = {
        name: entry["id"]
        for name, entry in json.loads((run_dir / "trackers.json").read_text()).items()
    }

    second = _logger(run_dir, everything, start_step=3)
    figure = plt.figure()
    second.log({"step": 3, "extrap/ppl@128": 7.5, "extrap/ppl_vs_length": figure})
    for step in range(4, 7):
        second.log({"step": step, "loss": 2.0 / step})
    second.close(0)
    saved = json.loads((run_dir / "trackers.json").read_text())
    assert {name: entry["id"] for name, entry in saved.items()} == ids

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records == [
        *({"step": s, "loss": 1.0 / s, "mfu": None} for s in (1, 2, 3)),
        {"step": 3, "extrap/ppl@128": 7.5},
        *({"step": s, "loss": 2.0 / s} for s in (4, 5, 6)),
    ]
    expected = [(s, "train/loss", 1.0 / s) for s in range(1, 6)]
    expected += [(3, "extrap/ppl@128", 7.5), (6, "train/loss", 2.0 / 6)]
    scalars = [e for e in wandb_history(run_dir) if e[1] != "extrap/ppl_vs_length"]
    assert sorted(scalars) == sorted(expected)
    images = [e for e in wandb_history(run_dir) if e[1] == "extrap/ppl_vs_length"]
    assert [(step, value["_type"]) for step, _, value in images] == [(3, "image-file")]

    uri = mlflow_tracking_uri(run_dir.parent)
    renamed = [(s, k.replace("@", ":"), v) for s, k, v in expected]
    assert sorted(mlflow_history(uri, ids["mlflow"])) == sorted(renamed)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(ids["mlflow"])
    assert run.info.status == "FINISHED" and run.data.params["train.lr"] == "0.1"
    [plot] = client.list_artifacts(ids["mlflow"], "extrap/ppl_vs_length")
    assert plot.path == "extrap/ppl_vs_length/step_00000003.png"


def test_a_tracker_added_at_a_resume_gets_the_history_first(trackers_env):
    run_dir = trackers_env / "late"
    first = _logger(run_dir, ["jsonl"], start_step=0)
    for step in (1, 2, 3):
        first.log({"step": step, "loss": float(step), "extrap/ppl@64": 10.0 + step})
    first.close(0)
    assert not (run_dir / "trackers.json").exists()

    second = _logger(run_dir, ["jsonl", "wandb"], start_step=2)  # step 3 is redone
    second.log({"step": 3, "loss": 30.0})
    second.close(0)
    expected = [
        (s, k, v) for s in (1, 2) for k, v in (("train/loss", s), ("extrap/ppl@64", 10 + s))
    ]
    assert sorted(wandb_history(run_dir)) == sorted([*expected, (3, "train/loss", 30.0)])


def test_a_tracker_that_is_not_installed_stops_at_the_config(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a)
    )
    with pytest.raises(ConfigError, match=r"names mlflow, which is not installed: pip install"):
        load_config("configs/tiny.yaml", ["train.loggers=[tensorboard,mlflow]"])
    with pytest.raises(
        ConfigError, match=r"give each of tensorboard, jsonl, wandb, mlflow at most"
    ):
        load_config("configs/tiny.yaml", ["train.loggers=[jsonl,jsonl]"])


# ---------------------------------------------------------------- a tracker failing mid-run


class Breaking:
    """A tracker that fails from step `fails_at` on, or when closed (fails_at None)."""

    def __init__(self, fails_at: int | None):
        self.fails_at, self.calls = fails_at, []

    def scalars(self, step, values):
        self.calls.append(step)
        if self.fails_at is not None and step >= self.fails_at:
            raise OSError(28, "No space left on device\n(details)")

    def figure(self, tag, figure, step):
        self.scalars(step, {})

    def close(self, exit_code):
        self.calls.append("close")
        if self.fails_at is None:
            raise RuntimeError("the server is gone")


def test_a_failing_tracker_is_dropped_with_one_warning(trackers_env, caplog):
    """Failing in log or in close: one warning line naming it and the error; it is called no
    more, and trackers.json keeps what it took; the other sinks go on."""
    run_dir = trackers_env / "breaking"
    logger = _logger(run_dir, ["jsonl", "tensorboard"], start_step=0)
    wandb, mlflow = Breaking(2), Breaking(None)
    logger.trackers["wandb"], logger.trackers["mlflow"] = wandb, mlflow
    logger.state["wandb"] = {"id": "w", "last_step": {}}
    for step in range(1, 5):
        logger.log({"step": step, "loss": 1.0 / step})
    logger.close(0)
    assert wandb.calls == [1, 2] and mlflow.calls == [1, 2, 3, 4, "close"]
    assert list(logger.trackers) == ["tensorboard"]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [
        "train.loggers: wandb failed at step 2 (OSError: [Errno 28] No space left on device); "
        "it is dropped, the run goes on (metrics.jsonl, tensorboard, mlflow still record it)",
        "train.loggers: mlflow failed closing (RuntimeError: the server is gone); ignored",
    ]
    assert logger.trackers["tensorboard"].writer.all_writers is None  # closed all the same
    assert logger.dropped == {
        "wandb": "OSError: [Errno 28] No space left on device",
        "mlflow": "RuntimeError: the server is gone",
    }
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    saved = json.loads((run_dir / "trackers.json").read_text())
    assert saved["wandb"]["last_step"] == {"train/loss": 1}  # step 2 never reached it


# Without mount (not root, or no CAP_SYS_ADMIN): every write under STORE fails once FLAG
# exists, as on a read-only file system (a sitecustomize module of the training process).
READ_ONLY_WHEN_FLAGGED = """
import builtins, errno, os
_open, _os_open = builtins.open, os.open
_store, _flag = os.environ["FAULT_STORE"], os.environ["FAULT_FLAG"]

def _refused(path, writing):
    return writing and os.path.exists(_flag) and os.path.abspath(os.fspath(path)).startswith(_store)

def _fail(path):
    raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))

def open(file, mode="r", *args, **kwargs):
    if isinstance(file, (str, bytes, os.PathLike)) and _refused(file, set(mode) & set("wax+")):
        _fail(file)
    return _open(file, mode, *args, **kwargs)

def os_open(path, flags, *args, **kwargs):
    if _refused(path, flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)):
        _fail(path)
    return _os_open(path, flags, *args, **kwargs)

builtins.open, os.open = open, os_open
"""


@contextlib.contextmanager
def store_that_can_turn_read_only(directory: Path):
    """A directory for a tracker's store and a function that makes it read-only, for root
    too: a tmpfs remounted read-only where mount works, else failing writes injected into the
    process (its environment, to pass on). Unmounted at the end."""
    directory.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(directory)]
    mounted = os.geteuid() == 0 and subprocess.run(mount, capture_output=True).returncode == 0
    try:
        if mounted:
            yield "tmpfs", {}, lambda: _remount_read_only(directory)
        else:
            injected = directory.parent / "inject"
            injected.mkdir()
            (injected / "sitecustomize.py").write_text(READ_ONLY_WHEN_FLAGGED)
            flag = directory.parent / "read-only"
            env = {
                "PYTHONPATH": os.pathsep.join([str(injected), os.environ.get("PYTHONPATH", "")]),
                "FAULT_STORE": str(directory.resolve()),
                "FAULT_FLAG": str(flag),
            }
            yield "injected", env, flag.touch
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(directory)], check=False)


def _remount_read_only(directory: Path) -> None:
    for _ in range(200):  # busy while a file there is open for writing: try again
        done = subprocess.run(
            ["mount", "-o", "remount,ro", str(directory)], capture_output=True, check=False
        )
        if done.returncode == 0:
            return
        time.sleep(0.01)
    raise AssertionError(f"could not remount {directory} read-only: {done.stderr!r}")


def test_a_tracker_failing_mid_run_costs_the_run_nothing(stdlib_dataset, tmp_path):
    """A real run logging to MLflow (a file store), TensorBoard and metrics.jsonl; after step 3
    the store turns read-only. MLflow is dropped with one warning; the run finishes (exit 0)
    with every checkpoint, every record in metrics.jsonl and TensorBoard, and its summary."""
    run_dir = tmp_path / "runs" / "ro"
    with store_that_can_turn_read_only(tmp_path / "store") as (how, env, make_read_only):
        args = tiny_run_args(
            run_dir,
            stdlib_dataset,
            "train.max_steps=12",
            "train.checkpoint_every=4",
            "train.log_every=1",
            "train.warmup_steps=2",
            "eval.every_checkpoint=false",
            "train.loggers=[tensorboard,jsonl,mlflow]",
        )
        uri = (tmp_path / "store" / "mlruns").as_uri()
        train = subprocess.Popen(
            [sys.executable, "-m", "launch.train", *args],
            cwd=ROOT,
            env={**os.environ, **env, "MLFLOW_TRACKING_URI": uri, "MLFLOW_ALLOW_FILE_STORE": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            metrics, deadline = run_dir / "metrics.jsonl", time.monotonic() + 300
            while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
                assert train.poll() is None, train.communicate()[1][-3000:]
                assert time.monotonic() < deadline, "training never reached step 3"
                time.sleep(0.01)
            train.send_signal(signal.SIGSTOP)  # at step 3 or 4, while the store changes
            try:
                make_read_only()
            finally:
                train.send_signal(signal.SIGCONT)
            _, err = train.communicate(timeout=300)
        finally:
            if train.poll() is None:
                train.kill()
        assert train.returncode == 0, err[-3000:]
        if how == "tmpfs":  # it is read-only indeed, for root too
            with pytest.raises(OSError, match="Read-only file system"):
                (tmp_path / "store" / "probe").write_text("x")
        run_id = json.loads((run_dir / "trackers.json").read_text())["mlflow"]["id"]
        sent = mlflow_history(uri, run_id)

    warnings = [line for line in err.splitlines() if "train.loggers: mlflow failed" in line]
    assert len(warnings) == 1, err[-3000:]
    kept = "it is dropped, the run goes on (metrics.jsonl, tensorboard still record it)"
    assert kept in warnings[0]
    assert "Traceback" not in err, err[-3000:]
    assert "run ro: finished" in err and "steps 0 -> 12 of 12" in err  # the summary
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert checkpoints == ["step_12", "step_4", "step_8"]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 13))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(run_dir / "tb"))
    board.Reload()
    assert [e.step for e in board.Scalars("train/loss")] == list(range(1, 13))
    # MLflow kept what it took before the store turned read-only, and trackers.json says so.
    steps = sorted({step for step, key, _ in sent if key == "train/loss"})
    assert steps == list(range(1, len(steps) + 1)) and 2 <= len(steps) < 12
    last = json.loads((run_dir / "trackers.json").read_text())["mlflow"]["last_step"]
    assert last["train/loss"] == steps[-1]
