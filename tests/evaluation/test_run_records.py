"""A finished study run's record: written from a run, trusted only when well formed, stale
when a shared setting changed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evaluation.run_records import (
    RecordError,
    config_differences,
    read_record,
    record_path,
    write_record,
)
from training.config import load_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def cfg():
    return load_config(ROOT / "configs" / "ablation" / "hybrid_fox_seed1.yaml")


def _results(cfg) -> dict:
    return {"step": cfg.train.max_steps, "scheme": cfg.model.scheme, "ppl": {"128": 30.0}}


def test_a_record_reads_back_as_written_and_matches_its_config(tmp_path, cfg):
    path = write_record(tmp_path, cfg, _results(cfg), 612.5)
    assert path == tmp_path / "records" / "hybrid_fox_seed1.json"
    record = read_record(tmp_path, cfg)
    assert record["results"] == _results(cfg) and record["seconds"] == 612.5
    assert config_differences(record["config"], cfg) == []
    assert not list(path.parent.glob("*.tmp"))


def test_changed_settings_are_named_and_added_ones_ignored(tmp_path, cfg):
    write_record(tmp_path, cfg, _results(cfg), 1.0)
    record = read_record(tmp_path, cfg)
    record["config"]["train"]["lr"] = 1.0  # trained with another learning rate
    record["config"]["model"]["d_model"] = 7
    del record["config"]["eval"]["lengths"]  # a setting the record predates
    assert config_differences(record["config"], cfg) == ["model.d_model", "train.lr"]


def test_no_record_is_none(tmp_path, cfg):
    assert read_record(tmp_path, cfg) is None


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ("{", "not a readable run record"),
        ("[]", "holds exactly"),
        (json.dumps({"config": {}, "results": {}}), "holds exactly"),
        (json.dumps({"config": [], "results": {}, "seconds": 1}), "must be mappings"),
        (json.dumps({"config": {}, "results": {}, "seconds": float("nan")}), "finite"),
        (json.dumps({"config": {}, "results": {"step": 3, "scheme": "fox"}, "seconds": 1}),
         "not the final step"),
    ],
)  # fmt: skip
def test_a_malformed_record_is_one_clear_error(tmp_path, cfg, content, words):
    path = record_path(tmp_path, cfg.run.name)
    path.parent.mkdir(parents=True)
    path.write_text(content)
    with pytest.raises(RecordError, match=words):
        read_record(tmp_path, cfg)
