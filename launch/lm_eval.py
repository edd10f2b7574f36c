"""lm-evaluation-harness on a run's checkpoint: `python -m launch.lm_eval RUN
[--tasks rotalibi_heldout,...] [--step N] [--limit N] [--batch-size 1] [--max-length L]`
(`make lm-eval RUN=... TASKS=...`). What it does: evaluation/harness.py. --max-length (default:
the trained length) is the context lm-eval gives the model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from evaluation.harness import DEFAULT_TASKS, HarnessError, evaluate
from model.hf.convert import HFExportError
from training.export import ExportError


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.lm_eval", description=__doc__)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--tasks", default=DEFAULT_TASKS, help="comma-separated lm-eval tasks")
    parser.add_argument("--step", type=int, help="the checkpoint's step (default: the newest)")
    parser.add_argument("--limit", type=int, help="at most this many documents per task")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--max-length", type=int, help="context in tokens (default: trained)")
    args = parser.parse_args(argv)
    for name in ("limit", "batch_size", "max_length"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1 (got {value})")
    tasks = [task for task in args.tasks.split(",") if task]
    if not tasks:
        parser.error("--tasks is empty: name at least one lm-eval task")
    try:
        out = evaluate(
            args.run_dir,
            tasks,
            step=args.step,
            limit=args.limit,
            batch_size=args.batch_size,
            max_length=args.max_length,
        )
    except (ExportError, HFExportError, HarnessError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"lm-eval results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
