"""The extrapolation study's configs and its summary (the runs themselves take `make study`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evaluation.study import (
    recorded_seconds,
    report,
    study_configs,
    summarise,
    uncontrolled_settings,
)
from training.config import load_config

ROOT = Path(__file__).resolve().parents[2]
SCHEMES = {
    "rope", "alibi", "nope", "local", "kerple_log", "xpos", "accrot", "accrot_v",
    "random_accrot", "path", "hybrid", "path_alibi",
}  # fmt: skip


@pytest.mark.parametrize("study", ["study", "study_gpu"])
def test_study_runs_differ_only_in_scheme_name_and_seed(study):
    configs = study_configs(ROOT / "configs" / study)
    cfgs = [load_config(path) for path in configs]
    assert uncontrolled_settings(cfgs) == []
    seeds: dict[str, set[int]] = {}
    for cfg in cfgs:
        seeds.setdefault(cfg.model.scheme, set()).add(cfg.run.seed)
    assert set(seeds) == SCHEMES
    assert all(len(seeds[s]) >= 2 for s in ("rope", "accrot_v", "alibi", "hybrid"))
    assert len({cfg.run_dir for cfg in cfgs}) == len(configs)


def test_settings_a_study_must_not_vary_are_named(tmp_path):
    cfgs = [load_config(ROOT / "configs" / "study" / name) for name in ("rope.yaml", "alibi.yaml")]
    cfgs[1].train.lr = 1e-3
    cfgs[1].eval.windows += 1
    cfgs[1].run.seed = 7  # may vary
    assert uncontrolled_settings(cfgs) == ["eval.windows", "train.lr"]


def _result(scheme: str, run: str, ppl: dict[int, float]) -> dict:
    heads = [[1.0, 3.0, 5.0], [2.0, None, 4.0]]  # [layer][head]; None: no key that far
    return {
        "scheme": scheme,
        "run": run,
        "train_length": 128,
        "ppl": {str(n): v for n, v in ppl.items()},
        "ppl_beyond": {str(n): 2 * v for n, v in ppl.items() if n > 128},
        "mixing_window": {str(n): {"0.01": heads} for n in ppl},
        "far_mass": {str(n): heads for n in ppl if n > 128},
    }


def test_summary_averages_seeds_and_takes_ratios_to_the_trained_length():
    results = [
        _result("rope", "rope", {128: 10.0, 256: 30.0}),
        _result("rope", "rope_seed1", {128: 12.0, 256: 40.0}),
        _result("alibi", "alibi", {128: 11.0, 256: 11.0}),
    ]
    summary = summarise(results)
    assert summary["rope"]["runs"] == ["rope", "rope_seed1"]
    assert summary["rope"]["ppl"]["256"] == {
        "mean": 35.0,
        "spread": 5.0,
        "seeds": 2,
        "values": [30.0, 40.0],
    }
    assert summary["rope"]["ppl_beyond"]["256"]["mean"] == 70.0
    assert summary["rope"]["ratio"]["256"] == pytest.approx((30 / 10 + 40 / 12) / 2)
    assert summary["alibi"]["ratio"] == {"128": 1.0, "256": 1.0}
    assert summary["alibi"]["mixing_window"]["256"]["0.01"] == 3.0  # median of 5 heads
    markdown = report(summary, {"machine": "test", "hours": 1.0})
    assert "| rope | 11.0 ± 1.0 | 35.0 ± 5.0 |" in markdown
    assert "| alibi | 11.0 | 11.0 |" in markdown
    assert "| rope | 1.00 | 3.17 |" in markdown  # the ratio table
    assert summary["rope"]["rotation_drift"] is None
    assert "Drift of the learned rotations" not in markdown  # no scheme has any
    json.dumps(summary)  # summary.json


def test_summary_reports_the_rotation_drift_at_five_pairs_of_the_schemes_that_have_it():
    theta = [10000 ** (-p / 8) for p in range(8)]  # P = 8 pairs
    drift = {
        "length": 128,
        "windows": 1,
        "tokens": 128,
        "std": "population",
        "theta": theta,
        "static": [[0.0] * 8, [float(p) for p in range(8)]],  # [layer][pair]
        "spread": [[0.5] * 8, [100.0 + p for p in range(8)]],
    }
    hybrid = {**_result("hybrid", "hybrid", {128: 10.0}), "rotation_drift": drift}
    seed = {**_result("hybrid", "hybrid_seed1", {128: 10.0}), "rotation_drift": None}
    summary = summarise([hybrid, seed, _result("alibi", "alibi", {128: 11.0})])
    assert summary["hybrid"]["rotation_drift"] == {  # the first seed's
        "pairs": [0, 2, 4, 6, 7],
        "theta": [theta[p] for p in (0, 2, 4, 6, 7)],
        "static": [[0.0] * 5, [0.0, 2.0, 4.0, 6.0, 7.0]],
        "spread": [[0.5] * 5, [100.0, 102.0, 104.0, 106.0, 107.0]],
    }
    assert summary["alibi"]["rotation_drift"] is None
    markdown = report(summary, {"machine": "test", "hours": 1.0})
    assert "| scheme | layer | p = 0 | p = 2 | p = 4 | p = 6 | p = 7 |" in markdown
    assert "| hybrid | 0 | 0 / 0.5 | 0 / 0.5 | 0 / 0.5 | 0 / 0.5 | 0 / 0.5 |" in markdown
    assert "| hybrid | 1 | 0 / 100 | 2 / 102 | 4 / 104 | 6 / 106 | 7 / 107 |" in markdown
    assert "| alibi | 0" not in markdown
    json.dumps(summary)


def test_recorded_time_sums_each_interval_of_tokens_at_its_rate_and_the_evaluation(tmp_path):
    records = [
        {"step": 10, "tokens": 1000, "tokens_per_s": 500.0},
        {"step": 10, "extrap/ppl@128": 9.0},  # an evaluation record: no time of its own
        {"step": 20, "tokens": 4000, "tokens_per_s": 1000.0},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert recorded_seconds(tmp_path, {"seconds": {"128": 7.0, "total": 7.0}}) == pytest.approx(
        1000 / 500 + 3000 / 1000 + 7
    )
