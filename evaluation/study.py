"""The extrapolation study report: the run configs of a study folder, the summary of their
newest evaluations (mean and spread over seeds, attention diagnostics, rotation drift) and the
markdown tables docs/study.md quotes. `python -m launch.study` (launch/study.py) trains the runs
and writes the report.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import yaml

from evaluation.run_records import flat_settings
from training.config import Config, ConfigError, to_yaml

VARIED = ("run.name", "run.seed", "model.scheme")  # what a study's runs may differ in


def study_configs(study_dir: Path) -> list[Path]:
    """The run configs of a study folder (every YAML file but its base)."""
    configs = sorted(p for p in study_dir.glob("*.yaml") if p.name != "base.yaml")
    if not configs:
        raise ConfigError(f"{study_dir} holds no study config (*.yaml besides base.yaml)")
    return configs


def uncontrolled_settings(cfgs: list[Config]) -> list[str]:
    """The settings in which a study's runs differ besides VARIED: a study compares schemes
    under one model size, budget, learning rate, schedule and evaluation."""
    flats = [flat_settings(yaml.safe_load(to_yaml(cfg))) for cfg in cfgs]
    keys = set().union(*flats) - set(VARIED)
    return sorted(k for k in keys if len({repr(f.get(k)) for f in flats}) > 1)


def recorded_seconds(run_dir: Path, evaluation: dict) -> float:
    """The time a run spent training and evaluating, as its own files record it: each
    metrics.jsonl training record covers its tokens at its tokens/s; the evaluation JSON
    holds its seconds in total. (So a study resumed over finished runs still reports their time.)"""
    seconds, tokens = 0.0, 0
    with open(run_dir / "metrics.jsonl") as f:
        for record in map(json.loads, f):
            if "tokens_per_s" in record:
                seconds += (record["tokens"] - tokens) / record["tokens_per_s"]
                tokens = record["tokens"]
    return seconds + evaluation["seconds"]["total"]


def _mean_and_spread(values: list[float]) -> dict:
    """Mean over seeds, the spread (half the range; 0 for one seed) and each seed's value."""
    return {
        "mean": statistics.fmean(values),
        "spread": (max(values) - min(values)) / 2,
        "seeds": len(values),
        "values": values,
    }


def _head_summary(per_layer_head: list[list[float | None]]) -> float | None:
    """The median over every layer and head (None where a head's value is undefined)."""
    values = [v for layer in per_layer_head for v in layer if v is not None]
    return statistics.median(values) if values else None


def drift_pairs(pairs: int) -> list[int]:
    """The pairs the study reports the rotation drift at: p = 0, P/4, P/2, 3P/4, P-1."""
    return sorted({0, pairs // 4, pairs // 2, 3 * pairs // 4, pairs - 1})


def _drift_summary(drift: dict | None) -> dict | None:
    """The rotation drift (evaluation.extrapolation's `rotation_drift`) at `drift_pairs`."""
    if not drift:
        return None
    pairs = drift_pairs(len(drift["theta"]))
    at_pairs = lambda per_layer: [[values[p] for p in pairs] for values in per_layer]  # noqa: E731
    return {
        "pairs": pairs,
        "theta": [drift["theta"][p] for p in pairs],
        "static": at_pairs(drift["static"]),
        "spread": at_pairs(drift["spread"]),
    }


def summarise(results: list[dict]) -> dict:
    """Per scheme: perplexity by length (all positions and beyond L_train; mean and spread
    over seeds), its ratio to the trained length's, and the first seed's diagnostics and
    (learned rotations) rotation drift at a few pairs."""
    schemes: dict[str, list[dict]] = {}
    for r in results:
        schemes.setdefault(r["scheme"], []).append(r)
    summary = {}
    for scheme, runs in schemes.items():
        lengths = sorted(int(n) for n in runs[0]["ppl"])
        trained = str(runs[0]["train_length"])
        entry: dict = {"runs": [r["run"] for r in runs], "ppl": {}, "ppl_beyond": {}, "ratio": {}}
        for n in map(str, lengths):
            entry["ppl"][n] = _mean_and_spread([r["ppl"][n] for r in runs])
            entry["ratio"][n] = statistics.fmean(r["ppl"][n] / r["ppl"][trained] for r in runs)
            if n in runs[0]["ppl_beyond"]:
                entry["ppl_beyond"][n] = _mean_and_spread([r["ppl_beyond"][n] for r in runs])
        first = runs[0]
        entry["mixing_window"] = {
            n: {eps: _head_summary(v) for eps, v in by_eps.items()}
            for n, by_eps in first.get("mixing_window", {}).items()
        }
        entry["far_mass"] = {n: _head_summary(v) for n, v in first.get("far_mass", {}).items()}
        entry["rotation_drift"] = _drift_summary(first.get("rotation_drift"))
        entry["unavailable"] = first.get("unavailable", {})
        summary[scheme] = entry
    return summary


def ppl_table(summary: dict, key: str, lengths: list[str]) -> str:
    header = ["scheme", *[f"{n}" for n in lengths]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for scheme, entry in summary.items():
        cells = []
        for n in lengths:
            value = entry[key].get(n)
            if value is None:
                cells.append("-")
            elif isinstance(value, float):
                cells.append(f"{value:.2f}")
            elif value["seeds"] > 1:
                cells.append(f"{value['mean']:.1f} ± {value['spread']:.1f}")
            else:
                cells.append(f"{value['mean']:.1f}")
        lines.append("| " + " | ".join([scheme, *cells]) + " |")
    return "\n".join(lines) + "\n"


def _diagnostics_table(summary: dict, lengths: list[str]) -> str:
    header = ["scheme", *[f"{n}: window@0.01 / far mass" for n in lengths]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for scheme, entry in summary.items():
        cells = []
        for n in lengths:
            window = entry["mixing_window"].get(n, {}).get("0.01")
            far = entry["far_mass"].get(n)
            cells.append(
                "-" if window is None else f"{window:.0f} / {'-' if far is None else f'{far:.3f}'}"
            )
        lines.append("| " + " | ".join([scheme, *cells]) + " |")
    return "\n".join(lines) + "\n"


def _drift_table(summary: dict) -> str:
    """Per scheme with learned rotations and layer: static drift / spread at a few pairs (one
    table per set of pairs; empty without such schemes)."""
    groups: dict[tuple, list[str]] = {}
    for scheme, entry in summary.items():
        drift = entry.get("rotation_drift")
        if drift:
            groups.setdefault(tuple(drift["pairs"]), []).append(scheme)
    tables = []
    for pairs, schemes in groups.items():
        header = ["scheme", "layer", *[f"p = {p}" for p in pairs]]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for scheme in schemes:
            drift = summary[scheme]["rotation_drift"]
            for layer, (static, spread) in enumerate(
                zip(drift["static"], drift["spread"], strict=True)
            ):
                cells = [f"{a:.3g} / {b:.3g}" for a, b in zip(static, spread, strict=True)]
                lines.append("| " + " | ".join([scheme, str(layer), *cells]) + " |")
        tables.append("\n".join(lines) + "\n")
    return "\n".join(tables)


def _drift_section(summary: dict) -> list[str]:
    table = _drift_table(summary)
    if not table:
        return []
    return [
        "## Drift of the learned rotations from RoPE (first seed; median over key/value heads)",
        "",
        "Each cell, per layer and pair p (theta_p: RoPE's frequency, p = 0 the highest): "
        "static drift / spread. Static drift: `|s_p - theta_p| / theta_p`, s_p the angle "
        "increment at x = 0; spread: the standard deviation of the data-dependent part of the "
        "increment over the held-out tokens at the trained length, over theta_p. Both are 0 at "
        "initialisation; 1 is a change by RoPE's whole angle per token.",
        "",
        table,
    ]


def report(summary: dict, machine: dict) -> str:
    """results.md: the perplexity tables and the diagnostics behind them."""
    lengths = sorted({n for e in summary.values() for n in e["ppl"]}, key=int)
    beyond = sorted({n for e in summary.values() for n in e["ppl_beyond"]}, key=int)
    return "\n".join(
        [
            "# Extrapolation study: results",
            "",
            f"Written by `python -m launch.study` on {machine['machine']}; the runs recorded "
            f"{machine['hours']:.2f} h of training and evaluation. Perplexity on the same "
            "held-out text at every length; mean ± spread (half the range) over seeds where a "
            "scheme has two.",
            "",
            "## Perplexity, all positions, by evaluation length",
            "",
            ppl_table(summary, "ppl", lengths),
            "## Perplexity of the positions beyond the trained length",
            "",
            ppl_table(summary, "ppl_beyond", beyond),
            "## Perplexity relative to the trained length's (all positions; mean over seeds)",
            "",
            ppl_table(summary, "ratio", lengths),
            "## Diagnostics (first seed; median over layers and heads)",
            "",
            "Mixing window: the fewest nearest keys holding 99% of the attention mass. Far "
            "mass: the attention mass on keys beyond the trained length.",
            "",
            _diagnostics_table(summary, lengths),
            *_drift_section(summary),
        ]
    )
