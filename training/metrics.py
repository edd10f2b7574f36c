"""What rank 0 reports (`metrics.jsonl`, TensorBoard, W&B, MLflow, a progress bar) and MFU.

MFU is the model's training FLOPs per second over the hardware peak of the devices used.
Training FLOPs per token are 6 N for the matrix products (N = the weights of every linear map,
the output head included) plus 12 L d T_eff for attention (scores and weighted values, forward
and backward; T_eff = the mean number of keys a query sees under the causal mask and window).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn
from tqdm import tqdm

from training.checkpoint import write_atomically

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger("rotalibi")

# Dense bf16 peak TFLOP/s of common accelerators, per device (SXM parts).
KNOWN_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0}


def training_flops_per_token(model: nn.Module, seq_len: int, window: int | None) -> float:
    """6 N + 12 L d T_eff, see the module docstring."""
    n_matmul = sum(
        getattr(m.weight, "ds_numel", m.weight.numel())  # ZeRO-3 partitioned: the full count
        for m in model.modules()
        if isinstance(m, nn.Linear)
    )
    layers, width = model.cfg.n_layers, model.cfg.d_model
    if window is None or window >= seq_len:
        keys_seen = (seq_len + 1) / 2
    else:  # the first `window` queries see 1..window keys, the rest `window`
        keys_seen = (window * (window + 1) / 2 + (seq_len - window) * window) / seq_len
    return 6 * n_matmul + 12 * layers * width * keys_seen


def peak_tflops(configured: float | None, device: torch.device) -> tuple[float | None, str]:
    """Per-device peak TFLOP/s and where it came from: the config, a known GPU, or (CPU) a
    short float32 matmul measurement."""
    if configured is not None:
        return configured, "train.peak_tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in KNOWN_PEAK_TFLOPS.items():
            if key in name:
                return value, f"the {key} datasheet"
        return None, f"unknown for {name}: set train.peak_tflops"
    a = torch.randn(1024, 1024)
    a @ a  # warm-up
    start, reps = time.perf_counter(), 8
    for _ in range(reps):
        a @ a
    seconds = time.perf_counter() - start
    return 2 * 1024**3 * reps / seconds / 1e12, "a float32 matmul measured at start-up"


def memory_gb(device: torch.device) -> float:
    """Peak memory of this process: device memory on CUDA, resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class Interval:
    """Sums over the steps since the last log line."""

    def __init__(self):
        self.start = time.perf_counter()
        self.loss, self.good_steps, self.data_wait, self.tokens = 0.0, 0, 0.0, 0
        self.steps, self.documents = 0, 0.0

    def add(self, loss: float, good: bool, data_wait: float, tokens: int, documents: float) -> None:
        if good:
            self.loss += loss
            self.good_steps += 1
        self.data_wait += data_wait
        self.tokens += tokens
        self.steps += 1
        self.documents += documents

    def summary(self) -> dict:
        """Mean loss of the good steps, tokens/s, the fraction of time spent on data and the
        mean number of distinct documents in a (rank 0) batch."""
        elapsed = time.perf_counter() - self.start
        return {
            "loss": self.loss / self.good_steps if self.good_steps else float("nan"),
            "tokens_per_s": self.tokens / elapsed,
            "data_wait_fraction": self.data_wait / elapsed,
            "documents_per_batch": self.documents / self.steps if self.steps else float("nan"),
        }


def _parsed(line: str) -> dict | None:
    """A metrics.jsonl record; None for a line a killed run left unfinished."""
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def tracker_key(key: str) -> str:
    """A record's key as the trackers name it: `train/<key>` unless it has a group already."""
    return key if "/" in key else f"train/{key}"


def scalars_of(record: dict) -> dict[str, float]:
    """The numeric values of a record (not its step), under their tracker names."""
    return {
        tracker_key(key): value
        for key, value in record.items()
        if key != "step" and isinstance(value, int | float) and not isinstance(value, bool)
    }


class Tracker(Protocol):
    """One destination of rank 0's records besides metrics.jsonl."""

    def scalars(self, step: int, values: dict[str, float]) -> None: ...

    def figure(self, tag: str, figure: Figure, step: int) -> None: ...

    def close(self, exit_code: int) -> None: ...


class TensorBoardTracker:
    """Scalars and images under `<directory>`. With `purge_after`, the steps after it (left by
    a run that died after the checkpoint resumed from) are purged: the resumed run writes them
    again."""

    def __init__(self, directory: Path, purge_after: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        purge = None if purge_after is None else purge_after + 1
        self.writer = SummaryWriter(str(directory), purge_step=purge)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def figure(self, tag: str, figure: Figure, step: int) -> None:
        self.writer.add_figure(tag, figure, step, close=False)
        self.writer.flush()

    def close(self, exit_code: int) -> None:
        self.writer.close()


class WandbTracker:
    """A W&B run under `<run_dir>/wandb`, resumed by the id kept in trackers.json. Its x axis
    is the training step (`step`), so that evaluations logged at a step already charted land
    on it (W&B's own step only grows)."""

    def __init__(self, run_dir: Path, config: dict, project: str, run_id: str | None):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(
            project=project,
            name=config["run"]["name"],
            id=run_id,  # None: a new run
            resume="allow",
            dir=str(run_dir),
            config=config,
        )
        self.id = self.run.id
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log({**values, "step": step})

    def figure(self, tag: str, figure: Figure, step: int) -> None:
        self.run.log({tag: self.wandb.Image(figure), "step": step})

    def close(self, exit_code: int) -> None:
        self.run.finish(exit_code=exit_code)


def _flat(config: dict, prefix: str = "") -> dict[str, str]:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = json.dumps(value)
    return flat


def mlflow_tracking_uri(runs_dir: Path) -> str:
    """MLFLOW_TRACKING_URI, else a file store beside the runs: `<run.dir>/mlruns`."""
    return os.environ.get("MLFLOW_TRACKING_URI") or (runs_dir / "mlruns").resolve().as_uri()


class MlflowTracker:
    """An MLflow run, resumed by the id kept in trackers.json; the config as its parameters.
    The tracking URI is MLFLOW_TRACKING_URI, else a file store under `<run.dir>/mlruns`
    (allowed with MLFLOW_ALLOW_FILE_STORE, which MLflow >= 3.7 asks for). MLflow's names have
    no '@': `extrap/ppl@256` is logged as `extrap/ppl:256`."""

    def __init__(self, runs_dir: Path, config: dict, experiment: str, run_id: str | None):
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient

        uri = mlflow_tracking_uri(runs_dir)
        if uri.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client, self.metric = MlflowClient(tracking_uri=uri), Metric
        if run_id is not None:
            self.client.update_run(run_id, status="RUNNING")
            self.id = run_id
            return
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        self.id = self.client.create_run(experiment_id, run_name=config["run"]["name"]).info.run_id
        params = list(_flat(config).items())
        for i in range(0, len(params), 100):  # MLflow takes at most 100 per batch
            batch = [Param(key, value[:6000]) for key, value in params[i : i + 100]]
            self.client.log_batch(self.id, params=batch)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        metrics = [self.metric(k.replace("@", ":"), float(v), now, step) for k, v in values.items()]
        self.client.log_batch(self.id, metrics=metrics)

    def figure(self, tag: str, figure: Figure, step: int) -> None:
        self.client.log_figure(self.id, figure, f"{tag}/step_{step:08d}.png")

    def close(self, exit_code: int) -> None:
        status = "FINISHED" if exit_code == 0 else "KILLED"
        self.client.set_terminated(self.id, status=status)


EXTERNAL_TRACKERS = {"wandb": WandbTracker, "mlflow": MlflowTracker}


class MetricsLogger:
    """Rank 0's sinks: metrics.jsonl, the trackers of train.loggers and the progress bar.

    `log` takes a record (its `step`, numbers, and matplotlib figures such as the evaluation's
    plot) to each sink. A resumed run continues the same W&B and MLflow runs, whose ids
    `<run_dir>/trackers.json` keeps with the last step each of them got of each key: a value
    is sent once (a run that died after its last checkpoint keeps, in those trackers, what it
    sent of the steps after it), and values of metrics.jsonl a tracker lacks (a tracker added
    at a resume) are sent first. metrics.jsonl and TensorBoard drop the dead run's records
    after the checkpoint resumed from: the resumed run writes them again.

    A tracker that fails while the run trains (in `log` or `close`: a store turned read-only
    or full, a server gone) costs the run nothing: one warning names it and the error, and
    it is dropped, never called again (a broken store's calls may fail slowly, after their
    retries); metrics.jsonl and the other trackers go on. trackers.json keeps what it did
    receive, so a resumed run sends it what it lacks up to the checkpoint. A tracker that
    cannot start fails the constructor (the run stops before training)."""

    def __init__(
        self,
        run_dir: Path,
        config: dict,
        *,
        loggers: list[str],
        project: str,
        start_step: int,
        max_steps: int,
    ):
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / "metrics.jsonl"
        kept = [
            record
            for line in (path.read_text().splitlines() if path.exists() else [])
            if (record := _parsed(line)) is not None and record["step"] <= start_step
        ]
        self.jsonl = None
        if "jsonl" in loggers:
            write_atomically(path, "".join(json.dumps(r) + "\n" for r in kept))
            self.jsonl = path.open("a")
        self.trackers: dict[str, Tracker] = {}
        self.dropped: dict[str, str] = {}  # name: the error that dropped it
        if "tensorboard" in loggers:
            self.trackers["tensorboard"] = TensorBoardTracker(
                run_dir / "tb", purge_after=start_step
            )
        self.state_path = run_dir / "trackers.json"
        self.state = json.loads(self.state_path.read_text()) if self.state_path.exists() else {}
        for name in loggers:
            if name in EXTERNAL_TRACKERS:
                saved = self.state.setdefault(name, {"id": None, "last_step": {}})
                runs_dir = Path(config["run"]["dir"])
                where = run_dir if name == "wandb" else runs_dir
                tracker = EXTERNAL_TRACKERS[name](where, config, project, saved["id"])
                saved["id"] = tracker.id
                self.trackers[name] = tracker
                for record in kept:
                    self._send(name, record["step"], scalars_of(record), {})
        self._save_state()
        self.progress = tqdm(
            total=max_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True
        )

    def _send(self, name: str, step: int, values: dict[str, float], figures: dict) -> None:
        """What tracker `name` has not got yet of this step's values and figures; what it got
        is recorded once it has taken it."""
        last = self.state[name]["last_step"] if name in self.state else None
        if last is not None:
            values = {k: v for k, v in values.items() if last.get(k, 0) < step}
            figures = {k: v for k, v in figures.items() if last.get(k, 0) < step}
        if values:
            self.trackers[name].scalars(step, values)
            if last is not None:
                last.update(dict.fromkeys(values, step))
        for tag, figure in figures.items():
            self.trackers[name].figure(tag, figure, step)
            if last is not None:
                last[tag] = step

    def _drop(self, name: str, error: Exception, step: int | None) -> None:
        """Warn once that tracker `name` failed (at `step`, or closing: None), and send it
        nothing more."""
        del self.trackers[name]
        message = str(error).strip().splitlines()
        reason = f"{type(error).__name__}: {message[0]}" if message else type(error).__name__
        self.dropped[name] = reason
        if step is None:
            log.warning("train.loggers: %s failed closing (%s); ignored", name, reason)
            return
        kept = ["metrics.jsonl"] * (self.jsonl is not None) + list(self.trackers)
        log.warning(
            "train.loggers: %s failed at step %d (%s); it is dropped, the run goes on%s",
            name,
            step,
            reason,
            f" ({', '.join(kept)} still record it)" if kept else "",
        )

    def _save_state(self) -> None:
        if self.state:
            write_atomically(self.state_path, json.dumps(self.state, indent=1))

    def log(self, record: dict) -> None:
        from matplotlib.figure import Figure

        step = record["step"]
        figures = {k: v for k, v in record.items() if isinstance(v, Figure)}
        record = {k: v for k, v in record.items() if k not in figures}
        if self.jsonl is not None:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
        for name in list(self.trackers):
            try:
                self._send(name, step, scalars_of(record), figures)
            except Exception as e:  # the trackers' own errors, whatever their types
                self._drop(name, e, step)
        self._save_state()

    def advance(self, steps: int, loss: float, lr: float) -> None:
        self.progress.update(steps)
        self.progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)

    def close(self, exit_code: int) -> None:
        self.progress.close()
        if self.jsonl is not None:
            self.jsonl.close()
        for name, tracker in list(self.trackers.items()):
            try:
                tracker.close(exit_code)
            except Exception as e:  # the trackers' own errors, whatever their types
                self._drop(name, e, None)
