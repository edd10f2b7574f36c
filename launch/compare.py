"""Compare runs (schemes) by their newest evaluation: `python -m launch.compare RUN_DIR...`.

    python -m launch.compare runs/alibi runs/rope runs/hybrid [--out runs/compare]

Reads each run's newest `eval/step_<N>.json` (launch.evaluate) and writes `compare.png`
(perplexity against length, one curve per run, labelled by scheme) and `compare.md` (one row
per run: perplexity at every length, then beyond the trained length), and prints the table.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from launch.evaluate import load_results
from launch.plots import curve_of, ppl_vs_length


class CompareError(ValueError):
    """A run has nothing to compare."""


def newest_results(run_dir: Path) -> dict:
    if not run_dir.is_dir():
        raise CompareError(f"{run_dir} is not a directory; give run directories (runs/<name>)")
    found = load_results(run_dir / "eval")
    if not found:
        raise CompareError(
            f"{run_dir} has no evaluation (no eval/step_*.json); run "
            f"`python -m launch.evaluate {run_dir}` first"
        )
    return found[-1]


def labels(runs: list[Path], results: list[dict]) -> list[str]:
    """The scheme, plus the run's name where two runs share a scheme."""
    shared = Counter(r["scheme"] for r in results)
    return [
        r["scheme"] if shared[r["scheme"]] == 1 else f"{r['scheme']} ({run.name})"
        for run, r in zip(runs, results, strict=True)
    ]


def markdown_table(runs: list[Path], results: list[dict]) -> str:
    """One row per run: perplexity at each length, then beyond the trained length."""
    lengths = sorted({int(n) for r in results for n in r["lengths"]})
    beyond = sorted({int(n) for r in results for n in r["ppl_beyond"]})
    header = (
        ["run", "scheme", "step", "L_train"]
        + [f"ppl@{n}" for n in lengths]
        + [f"beyond@{n}" for n in beyond]
    )
    rows = []
    for run, r in zip(runs, results, strict=True):
        cells = [run.name, r["scheme"], str(r["step"]), str(r["train_length"])]
        cells += [_cell(r["ppl"].get(str(n))) for n in lengths]
        cells += [_cell(r["ppl_beyond"].get(str(n))) for n in beyond]
        rows.append(cells)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def compare(runs: list[Path], out: Path) -> str:
    """Write compare.png and compare.md into `out`; returns the table."""
    results = [newest_results(run) for run in runs]
    curves = [curve_of(r, label) for r, label in zip(results, labels(runs, results), strict=True)]
    train_lengths = {r["train_length"] for r in results}
    trained = train_lengths.pop() if len(train_lengths) == 1 else None
    out.mkdir(parents=True, exist_ok=True)
    figure = ppl_vs_length(
        curves, trained, "schemes compared (newest evaluation of each run)", ordered=False
    )
    figure.savefig(out / "compare.png", dpi=110)
    table = markdown_table(runs, results)
    (out / "compare.md").write_text(table)
    return table


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m launch.compare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("runs", nargs="+", type=Path, help="run directories")
    parser.add_argument(
        "--out", type=Path, default=Path("runs/compare"), help="default: runs/compare"
    )
    args = parser.parse_args(argv)
    try:
        table = compare(args.runs, args.out)
    except CompareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table, end="")
    print(f"wrote {args.out / 'compare.png'} and {args.out / 'compare.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
