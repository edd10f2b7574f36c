"""An evaluation's results files: eval/step_<N>.json (load, merge with what is recorded,
write; a finite perplexity is never replaced by a non-finite one unless forced) and the
eval/ppl_vs_length.png plot of every step evaluated."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

from evaluation.plots import curve_of, ppl_vs_length
from training import checkpoint as ckpt

if TYPE_CHECKING:
    from matplotlib.figure import Figure


log = logging.getLogger("rotalibi")


class ResultsError(ValueError):
    """A new evaluation would destroy a recorded result."""


def load_results(eval_dir: Path) -> list[dict]:
    """Every `step_<N>.json` of an eval directory, by step."""
    found = [json.loads(p.read_text()) for p in eval_dir.glob("step_*.json")]
    return sorted(found, key=lambda r: r["step"])


PER_LENGTH = (
    "windows", "ppl", "ppl_beyond", "mixing_window", "far_mass", "entropy", "mass_by_distance",
    "visited_fraction", "passkey", "passkey_nll", "seconds",
)  # fmt: skip


def merged(old: dict, new: dict) -> dict:
    """An earlier evaluation of the same checkpoint on the same held-out text updated with a
    new one, length by length: e.g. a long length evaluated later on a bigger machine joins
    the lengths evaluated during training. On other text the new one replaces it."""
    same = ("step", "scheme", "train_length", "held_out")
    if any(old.get(key) != new[key] for key in same):
        log.warning(
            "replacing the evaluation of step %d: it was made on other held-out text or "
            "settings (%s, now %s)", new["step"], old.get("held_out"), new["held_out"],
        )  # fmt: skip
        return new
    result = {**old, **new}
    for key in PER_LENGTH:
        result[key] = {**old.get(key, {}), **new.get(key, {})}
    evaluated = {str(n) for n in new["lengths"]}
    evaluated |= {f"passkey@{n}" for n in evaluated}
    kept = {k: v for k, v in old.get("skipped", {}).items() if k not in evaluated}
    result["skipped"] = {**kept, **new["skipped"]}
    result["lengths"] = sorted(set(old["lengths"]) | set(new["lengths"]))
    if old.get("receptive_field") and new["receptive_field"]:
        at_length = {**old["receptive_field"]["at_length"], **new["receptive_field"]["at_length"]}
        result["receptive_field"] = {**new["receptive_field"], "at_length": at_length}
    return result


def _lost_finite_results(old: dict, new: dict) -> list[str]:
    """The lengths whose finite perplexity in `old` is not finite in `new`."""

    def finite(value: object) -> bool:
        return isinstance(value, float | int) and math.isfinite(value)

    return [
        length
        for length, ppl in old.get("ppl", {}).items()
        if finite(ppl) and length in new["ppl"] and not finite(new["ppl"][length])
    ]


PLOT_TAG = "extrap/ppl_vs_length"  # the plot's name in TensorBoard and the other trackers


def write_outputs(results: dict, eval_dir: Path, *, force: bool = False) -> tuple[Path, Figure]:
    """step_<N>.json (merged into an earlier one of the same checkpoint) and the plot over
    every checkpoint evaluated so far (ppl_vs_length.png). Returns the JSON's path and the
    plot, for the trackers. ResultsError, before anything is written, when a recorded finite
    perplexity would become non-finite (unless `force`)."""
    eval_dir.mkdir(parents=True, exist_ok=True)
    path = eval_dir / f"step_{results['step']}.json"
    if path.is_file():
        old = json.loads(path.read_text())
        results = merged(old, results)
        lost = _lost_finite_results(old, results)
        if lost and not force:
            raise ResultsError(
                f"{path} holds finite perplexities at lengths {', '.join(lost)} and this "
                "evaluation's are not finite (a corrupted or diverged model?); kept the old "
                "results: pass --force to replace them"
            )
    ckpt.write_atomically(path, json.dumps(results, indent=1))
    every = load_results(eval_dir)
    title = f"{results['scheme']}: perplexity by length ({eval_dir.parent.name})"
    curves = [curve_of(r, f"step {r['step']}") for r in every]
    figure = ppl_vs_length(curves, results["train_length"], title)
    figure.savefig(eval_dir / "ppl_vs_length.png", dpi=110)
    return path, figure
