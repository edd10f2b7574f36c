"""What rank 0 reports: `metrics.jsonl`, TensorBoard scalars, a console progress bar, and MFU.

MFU is the model's training FLOPs per second over the hardware peak of the devices used.
Training FLOPs per token are 6 N for the matrix products (N = the weights of every linear map,
the output head included) plus 12 L d T_eff for attention (scores and weighted values, forward
and backward; T_eff = the mean number of keys a query sees under the causal mask and window).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from launch.checkpoint import write_atomically

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


class MetricsLogger:
    """Rank 0's sinks. `log` appends a record to metrics.jsonl and writes TensorBoard scalars
    under `train/` (or the record's own `group/name` keys)."""

    def __init__(self, run_dir: Path, *, start_step: int, max_steps: int):
        from torch.utils.tensorboard import SummaryWriter

        # Records past the step resumed from (written after its checkpoint by a run that then
        # died), and a line cut short by the kill, are dropped: one continuous history.
        path = run_dir / "metrics.jsonl"
        kept = [
            line
            for line in (path.read_text().splitlines() if path.exists() else [])
            if (record := _parsed(line)) is not None and record["step"] <= start_step
        ]
        write_atomically(path, "".join(line + "\n" for line in kept))
        self.jsonl = path.open("a")
        self.tensorboard = SummaryWriter(str(run_dir / "tb"), purge_step=start_step + 1)
        self.progress = tqdm(
            total=max_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True
        )

    def log(self, record: dict) -> None:
        step = record["step"]
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        for key, value in record.items():
            if key != "step" and isinstance(value, int | float):
                self.tensorboard.add_scalar(key if "/" in key else f"train/{key}", value, step)
        self.tensorboard.flush()

    def advance(self, steps: int, loss: float, lr: float) -> None:
        self.progress.update(steps)
        self.progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)

    def close(self) -> None:
        self.progress.close()
        self.jsonl.close()
        self.tensorboard.close()
