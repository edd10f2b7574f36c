"""lm-evaluation-harness on a run's checkpoint (`python -m launch.lm_eval`, `make lm-eval`).

Exports the checkpoint as a Hugging Face model (`launch.export --hf`, into
RUN/export/hf_step_<N>/; an export there is reused only when its record shows it was made from
this very checkpoint, by the sha256 of its manifest, with the weights unchanged since
(`launch.export.export_source_problem`); any other is replaced), checks that every task exists
(lm-eval's own and those of evaluation/tasks/, such as the offline rotalibi_heldout) and that
transformers reads the export, then runs lm-eval's `hf` model on it. The results go to
RUN/eval/lm_eval/step_<N>.json (lm-eval's results, configs and versions) and into the run's
TensorBoard log as `lm_eval/<task>/<metric>` at step N. The context lm-eval gives the model
(default: the trained length) bounds its rolling windows for perplexity tasks and truncates
the others.
"""

from __future__ import annotations

import difflib
import json
import os
import shutil
import sys
from pathlib import Path

import torch
import yaml

from training.export import export_hf, export_source_problem, pick_checkpoint

TASKS_DIR = Path(__file__).parent / "tasks"
DEFAULT_TASKS = "rotalibi_heldout"


class HarnessError(ValueError):
    """A task, run or export the harness cannot evaluate."""


def task_manager():
    """lm-eval's tasks plus this repository's (evaluation/tasks/)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR))


def check_tasks(manager, tasks: list[str]) -> None:
    """Every name must be an lm-eval task, group or tag."""
    known = manager.all_tasks
    for task in tasks:
        if task not in known:
            close = difflib.get_close_matches(task, known, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise HarnessError(f"unknown lm-eval task {task!r}{hint}")


def hf_export(checkpoint, out: Path) -> Path:
    """The checkpoint's Hugging Face export at `out`, written (whole, or not at all) unless an
    export verifiably made from this checkpoint is there (another one, stale or altered, is
    replaced, with a warning); transformers must be able to read its config."""
    from transformers import AutoConfig

    there = out.exists() or out.is_symlink()
    stale = export_source_problem(checkpoint, out) if there else None
    if stale is not None:
        print(f"warning: re-exporting {out}: {stale}", file=sys.stderr)
    if not there or stale is not None:
        partial = out.with_name(f"{out.name}.partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        export_hf(checkpoint, partial)
        if there:  # set aside, replaced, then removed: `out` is always a whole export
            old = out.with_name(f"{out.name}.stale-{os.getpid()}")
            out.rename(old)
            partial.rename(out)
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old)
            else:
                old.unlink()
        else:
            partial.rename(out)
    try:
        AutoConfig.from_pretrained(out, trust_remote_code=True)
    except Exception as e:  # transformers raises whatever the remote code or JSON raises
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise HarnessError(f"transformers cannot load the export {out}: {detail}") from None
    return out


def tensorboard_scalars(results: dict) -> dict[str, float]:
    """`lm_eval/<task>/<metric>` -> value for every numeric metric (no stderr, no aliases)."""
    scalars = {}
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            metric = key.split(",")[0]
            if isinstance(value, int | float) and not metric.endswith("_stderr"):
                scalars[f"lm_eval/{task}/{metric}"] = float(value)
    return scalars


def evaluate(
    run_dir: Path,
    tasks: list[str],
    *,
    step: int | None = None,
    limit: int | None = None,
    batch_size: int = 1,
    max_length: int | None = None,
) -> Path:
    """Run the harness on a checkpoint of `run_dir`; returns the results JSON's path."""
    import lm_eval
    from lm_eval.utils import handle_non_serializable
    from torch.utils.tensorboard import SummaryWriter

    checkpoint = pick_checkpoint(run_dir, step)
    manager = task_manager()
    check_tasks(manager, tasks)
    export_dir = hf_export(checkpoint, run_dir / "export" / f"hf_{checkpoint.path.name}")
    train_length = yaml.safe_load(checkpoint.manifest["config"])["data"]["seq_len"]
    results = lm_eval.simple_evaluate(
        model="hf",
        model_args={
            "pretrained": str(export_dir),
            "trust_remote_code": True,
            "dtype": "float32",
            "max_length": max_length or train_length,
        },
        tasks=tasks,
        task_manager=manager,
        limit=limit,
        batch_size=batch_size,
        device="cuda" if torch.cuda.is_available() else "cpu",
        log_samples=False,
    )
    out = run_dir / "eval" / "lm_eval" / f"step_{checkpoint.step}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".json.partial")
    partial.write_text(json.dumps(results, indent=1, default=handle_non_serializable))
    partial.replace(out)
    with SummaryWriter(str(run_dir / "tb")) as writer:
        for tag, value in tensorboard_scalars(results).items():
            writer.add_scalar(tag, value, checkpoint.step)
    return out
