"""Runs (schemes) compared by their newest evaluation: the newest results of each run, one plot
(perplexity against length, a curve per run) and one markdown table (`python -m launch.compare`,
launch/compare.py).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from evaluation.plots import curve_of, ppl_vs_length
from evaluation.results import load_results


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
