"""`launch.study` across checkouts: a run whose record matches its config is not trained
again and is reported from its record; a run whose settings changed is trained and recorded;
runs that differ in more than scheme, name and seed are refused."""

from __future__ import annotations

import json
from pathlib import Path

from evaluation.run_records import read_record, write_record
from launch import study
from training.config import load_config

ROOT = Path(__file__).resolve().parents[2]


def _results(cfg, ppl: float) -> dict:
    return {
        "step": cfg.train.max_steps,
        "scheme": cfg.model.scheme,
        "run": cfg.run.name,
        "train_length": 128,
        "ppl": {"128": ppl, "256": ppl + 1},
        "ppl_beyond": {"256": ppl + 2},
        "seconds": {"total": 5.0},
    }


def test_recorded_runs_are_skipped_and_changed_ones_trained(tmp_path, monkeypatch):
    folder, out = tmp_path / "study", tmp_path / "out"
    folder.mkdir()
    (folder / "base.yaml").write_text(
        f"base: {ROOT / 'configs/study/base.yaml'}\nrun:\n  dir: {tmp_path / 'runs'}\n"
    )
    for scheme in ("alibi", "rope"):
        (folder / f"{scheme}.yaml").write_text(
            f"base: base.yaml\nrun:\n  name: {scheme}\nmodel:\n  scheme: {scheme}\n"
        )
        cfg = load_config(folder / f"{scheme}.yaml")
        write_record(out, cfg, _results(cfg, 30.0), 100.0)

    trained = []

    def train(config: Path, cfg) -> None:  # what launch.train and launch.evaluate leave
        trained.append(cfg.run.name)
        (cfg.run_dir / "eval").mkdir(parents=True)
        (cfg.run_dir / "eval" / f"step_{cfg.train.max_steps}.json").write_text(
            json.dumps(_results(cfg, 20.0))
        )
        (cfg.run_dir / "metrics.jsonl").write_text(
            json.dumps({"tokens": 1000, "tokens_per_s": 100.0}) + "\n"
        )

    monkeypatch.setattr(study, "run_one", train)
    assert study.main([str(folder), "--out", str(out)]) == 0
    assert trained == []
    summary = json.loads((out / "summary.json").read_text())
    assert summary["schemes"]["rope"]["ppl"]["128"]["mean"] == 30.0
    assert summary["machine"]["seconds_per_run"] == {"alibi": 100.0, "rope": 100.0}

    with open(folder / "base.yaml", "a") as f:
        f.write("train:\n  lr: 0.001\n")  # the records are stale
    assert study.main([str(folder), "--out", str(out)]) == 0
    assert trained == ["alibi", "rope"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["schemes"]["rope"]["ppl"]["128"]["mean"] == 20.0
    cfg = load_config(folder / "rope.yaml")
    assert read_record(out, cfg)["config"]["train"]["lr"] == 0.001
    assert read_record(out, cfg)["seconds"] == 1000 / 100 + 5


def test_a_run_without_evaluation_or_record_is_one_clear_error(tmp_path, capsys):
    folder = tmp_path / "study"
    folder.mkdir()
    (folder / "base.yaml").write_text(
        f"base: {ROOT / 'configs/study/base.yaml'}\nrun:\n  dir: {tmp_path / 'runs'}\n"
    )
    (folder / "alibi.yaml").write_text("base: base.yaml\nrun:\n  name: alibi\n")
    assert study.main([str(folder), "--out", str(tmp_path / "out"), "--report-only"]) == 2
    assert "no record of it: train the run first" in capsys.readouterr().err


def test_runs_that_differ_in_other_settings_are_refused(tmp_path, capsys):
    folder = tmp_path / "study"
    folder.mkdir()
    (folder / "base.yaml").write_text(f"base: {ROOT / 'configs/study/base.yaml'}\n")
    (folder / "a.yaml").write_text("base: base.yaml\nrun:\n  name: a\n")
    (folder / "b.yaml").write_text("base: base.yaml\nrun:\n  name: b\ntrain:\n  lr: 0.1\n")
    assert study.main([str(folder), "--out", str(tmp_path / "out")]) == 2
    assert "differ in train.lr: a study compares schemes" in capsys.readouterr().err
