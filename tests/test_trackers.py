"""launch.metrics' sinks on their own: W&B (offline) and MLflow (file store) continue the same
run across a resume and get each value once; a tracker added at a resume gets the history;
a tracker that is not installed is a config error."""

from __future__ import annotations

import importlib.util
import json

import matplotlib

matplotlib.use("Agg")
import pytest
from matplotlib import pyplot as plt
from tracker_records import mlflow_history, wandb_history

from launch.config import ConfigError, load_config
from launch.metrics import MetricsLogger, mlflow_tracking_uri

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
