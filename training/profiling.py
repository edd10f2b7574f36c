"""`train.profile`: a `torch.profiler` trace of a few training steps, per rank.

Steps start .. start + steps - 1 (`ProfileConfig`) are recorded and written, when the last of
them ends, as `<run_dir>/profile/rank<R>.<time>.pt.trace.json`: Chrome's trace format, which
TensorBoard's profiler plugin and Perfetto open. Model code marks its parts with
`torch.profiler.record_function` (attention: `rotalibi.attention`). On CUDA, the allocator's
history over the same steps goes to `rank<R>_memory.pickle` (open it at
pytorch.org/memory_viz). A run resumed past `start` records nothing.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, tensorboard_trace_handler

from training.config import ProfileConfig

log = logging.getLogger("rotalibi")


class StepProfiler:
    """`before(step)` ahead of each training step and `after(step)` when it has ended."""

    def __init__(self, cfg: ProfileConfig | None, directory: Path, rank: int, device: torch.device):
        self.cfg, self.directory, self.rank, self.device = cfg, directory, rank, device
        self.profiler: profile | None = None

    def before(self, step: int) -> None:
        if self.cfg is None or step != self.cfg.start:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        activities = [ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
            torch.cuda.memory._record_memory_history()
        self.profiler = profile(
            activities=activities,
            on_trace_ready=tensorboard_trace_handler(str(self.directory), f"rank{self.rank}"),
            record_shapes=True,
            profile_memory=True,
            with_stack=False,
        )
        self.profiler.start()

    def after(self, step: int) -> None:
        if self.profiler is None:
            return
        self.profiler.step()  # marks the steps (ProfilerStep#N) in the trace
        if step == self.cfg.start + self.cfg.steps - 1:
            self.close()
            log.info("profiled steps %d..%d into %s", self.cfg.start, step, self.directory)

    def close(self) -> None:
        """Stop and write what was recorded (also when training stops inside the window)."""
        if self.profiler is None:
            return
        self.profiler.stop()
        self.profiler = None
        if self.device.type == "cuda":
            torch.cuda.memory._dump_snapshot(str(self.directory / f"rank{self.rank}_memory.pickle"))
            torch.cuda.memory._record_memory_history(enabled=None)
