"""What `launch.train` prints as it exits: how the run went and where its outputs are."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from evaluation.results import load_results
from training.config import Config
from training.metrics import mlflow_tracking_uri

ENDINGS = {
    0: "finished",
    3: "stopped: non-finite steps in a row",
    75: "stopped by a signal, checkpoint saved (requeue to resume)",
    130: "interrupted (Ctrl-C), checkpoint saved (run again to resume)",
}


@dataclass(frozen=True)
class RunProgress:
    """What this invocation of launch.train did."""

    first_step: int  # the step it started from (0, or the checkpoint resumed)
    last_step: int
    tokens: int  # trained in total, every invocation of the run
    tokens_now: int  # trained by this invocation
    seconds: float
    loss: float | None  # the mean loss over the ranks at the last step


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def _ppl(value: float) -> str:
    return f"{value:.2f}" if math.isfinite(value) else str(value)


def run_summary(cfg: Config, progress: RunProgress, exit_code: int) -> str:
    """A few lines: the ending, steps, tokens, loss and time, the newest evaluation's
    perplexity at each length (and on the tokens beyond the trained length), and the paths."""
    run_dir = cfg.run_dir
    ending = ENDINGS.get(exit_code, f"exit {exit_code}")
    loss = "n/a" if progress.loss is None else f"{progress.loss:.4f}"
    lines = [
        f"run {cfg.run.name}: {ending}",
        f"  steps {progress.first_step} -> {progress.last_step} of {cfg.train.max_steps}; "
        f"tokens {progress.tokens_now:,} this run, {progress.tokens:,} in all; "
        f"final loss {loss}; {_duration(progress.seconds)}",
    ]
    evaluations = load_results(run_dir / "eval") if (run_dir / "eval").is_dir() else []
    if evaluations:
        newest = evaluations[-1]
        train_length = newest["train_length"]
        lines.append(f"  perplexity at step {newest['step']} (trained at {train_length}):")
        for length, ppl in newest["ppl"].items():
            beyond = newest["ppl_beyond"].get(length)
            extra = "" if beyond is None else f" (beyond {train_length}: {_ppl(beyond)})"
            lines.append(f"    {int(length):>8,} tokens: {_ppl(ppl)}{extra}")
    lines.append(f"  run directory  {run_dir}")
    if "tensorboard" in cfg.train.loggers:
        lines.append(f"  TensorBoard    tensorboard --logdir {run_dir / 'tb'}")
    plot = run_dir / "eval" / "ppl_vs_length.png"
    if plot.is_file():
        lines.append(f"  ppl vs length  {plot}")
    if "wandb" in cfg.train.loggers:
        lines.append(f"  W&B            {run_dir / 'wandb'}")
    if "mlflow" in cfg.train.loggers:
        lines.append(f"  MLflow         {mlflow_tracking_uri(Path(cfg.run.dir))}")
    return "\n".join(lines)
