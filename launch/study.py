"""The extrapolation study: `python -m launch.study [STUDY_DIR] [--out DIR]` (`make study`).

Run from the repository root. Trains every config of STUDY_DIR (default configs/study: one
per scheme, a second seed for some; `base.yaml` is their common base and is not a run) one
after the other, each evaluated at its final checkpoint; a finished run is skipped and an
interrupted one resumes. Each finished run leaves its record in --out (default docs/study):
`records/<name>.json` (its config, final evaluation and time; see evaluation/run_records.py), so a
later checkout skips it too, unless its settings changed. Then it writes into --out
`ppl_vs_length.png` (one curve per scheme, the mean over its seeds), `results.md` (the tables
docs/study.md quotes) and `summary.json` (every number of those tables, the machine and the
time taken).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

from evaluation.compare import CompareError, newest_results
from evaluation.plots import Curve, ppl_vs_length
from evaluation.run_records import (
    RecordError,
    config_differences,
    read_record,
    record_path,
    write_record,
)
from evaluation.study import (
    VARIED,
    recorded_seconds,
    report,
    study_configs,
    summarise,
    uncontrolled_settings,
)
from training.config import Config, ConfigError, load_config


def run_one(config: Path, cfg: Config) -> None:
    """Train (or resume, or find finished) one run, then make sure its final checkpoint is
    evaluated."""
    python = [sys.executable, "-m"]
    subprocess.run([*python, "launch.train", str(config)], check=True)
    final = cfg.run_dir / "eval" / f"step_{cfg.train.max_steps}.json"
    if not final.is_file():  # a run finished earlier without its evaluation
        subprocess.run([*python, "launch.evaluate", str(cfg.run_dir)], check=True)


def recorded(out: Path, cfg: Config) -> dict | None:
    """The record of a run finished with these settings (None: train it)."""
    record = read_record(out, cfg)
    if record is None:
        return None
    changed = config_differences(record["config"], cfg)
    if changed:
        print(f"  {record_path(out, cfg.run.name)} is stale ({', '.join(changed)} changed)")
        return None
    return record


def final_results(out: Path, cfg: Config) -> tuple[dict, float]:
    """A run's final evaluation and recorded time: from its run directory where it has the
    final step's evaluation (refreshing its record), else from its record."""
    final = cfg.run_dir / "eval" / f"step_{cfg.train.max_steps}.json"
    if final.is_file():
        results = {**newest_results(cfg.run_dir), "run": cfg.run.name}
        seconds = recorded_seconds(cfg.run_dir, results)
        write_record(out, cfg, results, seconds)
        return results, seconds
    record = recorded(out, cfg)
    if record is None:
        raise CompareError(
            f"{cfg.run_dir} has no evaluation of step {cfg.train.max_steps} and "
            f"{record_path(out, cfg.run.name)} no record of it: train the run first"
        )
    return record["results"], record["seconds"]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m launch.study",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("study_dir", nargs="?", type=Path, default=Path("configs/study"))
    parser.add_argument("--out", type=Path, default=Path("docs/study"))
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: report on the runs as they are (e.g. a study run through SLURM)",
    )
    args = parser.parse_args(argv)
    try:
        configs = study_configs(args.study_dir)
        cfgs = [load_config(c) for c in configs]
        uncontrolled = uncontrolled_settings(cfgs)
        if uncontrolled:
            raise ConfigError(
                f"the runs of {args.study_dir} differ in {', '.join(uncontrolled)}: a study "
                f"compares schemes with every other setting equal (only {', '.join(VARIED)} "
                "may differ); compare other runs with `launch.compare`"
            )
        training = [] if args.report_only else list(zip(configs, cfgs, strict=True))
        for i, (config, cfg) in enumerate(training, 1):
            print(f"[study {i}/{len(configs)}] {config}", flush=True)
            if recorded(args.out, cfg) and not cfg.run_dir.is_dir():
                print(f"  finished earlier: {record_path(args.out, cfg.run.name)}")
                continue
            run_one(config, cfg)
            final_results(args.out, cfg)  # its record, kept even if a later run fails
        finals = [final_results(args.out, cfg) for cfg in cfgs]
    except (ConfigError, CompareError, RecordError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results = [r for r, _ in finals]
    seconds = {cfg.run.name: s for cfg, (_, s) in zip(cfgs, finals, strict=True)}
    summary = summarise(results)
    machine = {
        "machine": f"{platform.node()}, {os.cpu_count()} CPU cores, {platform.platform()}",
        "hours": sum(seconds.values()) / 3600,
        "seconds_per_run": seconds,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    curves = [
        Curve(
            scheme,
            {int(n): v["mean"] for n, v in entry["ppl"].items()},
            {int(n): v["mean"] for n, v in entry["ppl_beyond"].items()},
        )
        for scheme, entry in summary.items()
    ]
    trained = results[0]["train_length"]
    title = "extrapolation study: perplexity by length (mean over seeds)"
    ppl_vs_length(curves, trained, title, ordered=False).savefig(
        args.out / "ppl_vs_length.png", dpi=110
    )
    (args.out / "results.md").write_text(report(summary, machine))
    (args.out / "summary.json").write_text(
        json.dumps({"machine": machine, "schemes": summary}, indent=1)
    )
    print(f"wrote {args.out / 'results.md'}, summary.json and ppl_vs_length.png")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
