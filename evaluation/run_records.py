"""The record of a finished study run: its resolved config, final evaluation and time, kept
beside the study's report (`<out>/records/<name>.json`, committed with it). Run directories are
not committed, so a study that spans several checkouts (the ablation takes hours) skips a run
whose record matches its config, and reports from the record.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import yaml

from training.config import Config, to_yaml

RECORD_KEYS = {"config", "results", "seconds"}


class RecordError(ValueError):
    """A run record that cannot be trusted (malformed, or from another run)."""


def record_path(out: Path, run: str) -> Path:
    return out / "records" / f"{run}.json"  # not runs/: git ignores those


def flat_settings(tree: dict, prefix: str = "") -> dict[str, Any]:
    """A resolved config (or any nested mapping) as {dotted key: value}."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flat_settings(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_differences(recorded: dict, cfg: Config) -> list[str]:
    """The settings the record and `cfg` both have with different values. A setting only one
    of them has (added to the config schema since, with a default that keeps what the run
    did) is not a difference."""
    old, new = flat_settings(recorded), flat_settings(yaml.safe_load(to_yaml(cfg)))
    return sorted(k for k in old.keys() & new.keys() if old[k] != new[k])


def write_record(out: Path, cfg: Config, results: dict, seconds: float) -> Path:
    path = record_path(out, cfg.run.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"config": yaml.safe_load(to_yaml(cfg)), "results": results, "seconds": seconds}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(path)
    return path


def read_record(out: Path, cfg: Config) -> dict | None:
    """The record of `cfg`'s run, checked to be well formed and of its final step (None if
    there is none; a RecordError if it cannot be trusted). Whether it was trained with the
    same settings is `config_differences`'s to say."""
    path = record_path(out, cfg.run.name)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RecordError(f"{path}: not a readable run record ({e})") from e
    if not isinstance(record, dict) or set(record) != RECORD_KEYS:
        raise RecordError(f"{path}: a run record holds exactly {sorted(RECORD_KEYS)}")
    results, seconds = record["results"], record["seconds"]
    if not isinstance(record["config"], dict) or not isinstance(results, dict):
        raise RecordError(f"{path}: config and results must be mappings")
    if not isinstance(seconds, (int, float)) or not math.isfinite(seconds) or seconds < 0:
        raise RecordError(f"{path}: seconds must be a finite number >= 0, not {seconds!r}")
    if results.get("step") != cfg.train.max_steps or results.get("scheme") != cfg.model.scheme:
        raise RecordError(
            f"{path}: records step {results.get('step')} of {results.get('scheme')}, not "
            f"the final step {cfg.train.max_steps} of {cfg.model.scheme}"
        )
    return record
