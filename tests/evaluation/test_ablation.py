"""The ablation's configs and its report (the runs themselves take `make ablation`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from evaluation import ablation
from evaluation.ablation import (
    PLAN,
    factor_steps,
    gate_comparison,
    hybrid_beats_references,
    run_names,
    scaled_gap,
)
from evaluation.study import study_configs, summarise, uncontrolled_settings
from launch.ablation import main
from training.config import load_config, to_yaml

ROOT = Path(__file__).resolve().parents[2]
THREE_SEEDS = {"alibi", "path_alibi", "hybrid", "hybrid_scaled", "hybrid_fox"}
ONE_SEED = {
    "rope", "accrot", "accrot_scaled", "rope_alibi", "vorope_alibi", "accrot_alibi",
    "accrot_alibi_scaled", "fox", "path_fox",
}  # fmt: skip


def _resolved(path: Path) -> dict:
    return yaml.safe_load(to_yaml(load_config(path)))


def test_ablation_runs_differ_only_in_scheme_name_and_seed():
    cfgs = [load_config(path) for path in study_configs(ROOT / "configs" / "ablation")]
    assert uncontrolled_settings(cfgs) == []
    seeds, names = {}, {}
    for cfg in cfgs:
        seeds.setdefault(cfg.model.scheme, []).append(cfg.run.seed)
        names.setdefault(cfg.model.scheme, []).append(cfg.run.name)
    assert set(seeds) == THREE_SEEDS | ONE_SEED == set(PLAN)
    assert set(ablation.NOISE_SCHEMES) == THREE_SEEDS
    assert {s: sorted(v) for s, v in seeds.items()} == {
        **{s: [0, 1, 2] for s in THREE_SEEDS},
        **{s: [0] for s in ONE_SEED},
    }
    # launch.ablation's plan names the same runs, so it can tell which are missing
    assert {s: sorted(v) for s, v in names.items()} == {s: run_names(s, PLAN[s]) for s in PLAN}
    assert len(cfgs) == 24
    assert len({cfg.run_dir for cfg in cfgs}) == len(cfgs)


def test_ablation_base_is_the_study_base_in_its_own_run_directory():
    ablation_base = _resolved(ROOT / "configs" / "ablation" / "base.yaml")
    study_base = _resolved(ROOT / "configs" / "study" / "base.yaml")
    assert ablation_base["run"].pop("dir") != study_base["run"].pop("dir")
    assert ablation_base == study_base


# Synthetic summaries with known answers. Lengths 128 (trained), 1024, 8192; every three-seed
# scheme's seeds are its value - 0.1, + 0, + 0.1, so the noise is 0.1 at every length.
LENGTHS = (128, 1024, 8192)
MEANS = {
    "alibi": (30.0, 29.0, 29.0),
    "rope_alibi": (30.05, 30.0, 30.05),  # +0.05 (noise) at 128, +1.05 at 8192
    "vorope_alibi": (30.05, 30.0, 30.05),  # +0 (noise)
    "hybrid": (31.0, 30.5, 30.1),  # +0.95 at 128, +0.05 (noise) at 8192
    "accrot_alibi": (30.5, 30.4, 30.0),  # +0.45 at 128, -0.05 (noise) at 8192
    "hybrid_scaled": (28.0, 28.0, 28.0),  # -3.0, -2.1: beats alibi and path_alibi
    "path_alibi": (29.5, 28.8, 28.8),
    "hybrid_fox": (28.0, 28.0, 29.0),  # beats both but at 8192; vs hybrid_scaled: worse at 8192
    "fox": (29.0, 28.0, 28.0),  # alibi - 1: beats alibi
    "path_fox": (30.5, 29.8, 29.8),  # path_alibi + 1: loses
    "rope": (35.0, 80.0, 130.0),
    "accrot": (38.0, 40.0, 60.0),  # gap +3 at 128
    "accrot_scaled": (35.05, 37.0, 50.0),  # gap +0.05: closed
    "accrot_alibi_scaled": (30.0, 29.5, 29.5),
}


def _results(means: dict, skip: set[str] = frozenset()) -> list[dict]:
    results = []
    for scheme, values in means.items():
        offsets = (0.0, -0.1, 0.1) if PLAN[scheme] == 3 else (0.0,)
        for run, offset in zip(run_names(scheme, PLAN[scheme]), offsets, strict=True):
            if run in skip:
                continue
            ppl = {str(n): v + offset for n, v in zip(LENGTHS, values, strict=True)}
            results.append(
                {
                    "scheme": scheme,
                    "run": run,
                    "train_length": 128,
                    "ppl": ppl,
                    "ppl_beyond": {n: v + 0.5 for n, v in ppl.items() if int(n) > 128},
                }
            )
    return results


def _schemes(means: dict = MEANS, skip: set[str] = frozenset()) -> dict:
    return summarise(_results(means, skip))


def test_factor_steps_names_the_steps_beyond_the_noise_at_each_end():
    result = factor_steps(_schemes())
    assert result["lengths"] == ["128", "8192"]
    assert result["noise"] == pytest.approx({"128": 0.1, "8192": 0.1})
    changes = {(r["from"], r["to"]): r["change"] for r in result["rows"]}
    assert changes[("alibi", "rope_alibi")] == pytest.approx({"128": 0.05, "8192": 1.05})
    assert changes[("hybrid", "hybrid_scaled")] == pytest.approx({"128": -3.0, "8192": -2.1})
    at_128, at_8192 = result["verdict"].split(" At 8192")
    assert at_128.startswith("At 128 the hybrid is +1.00 from alibi (31.00 vs 30.00; noise 0.10)")
    assert at_128.endswith(
        ": the steps that cost more than the noise are learned free increments instead of "
        "RoPE's (vorope_alibi -> hybrid, +0.95) and learned q, k increments (side step) "
        "(rope_alibi -> accrot_alibi, +0.45); the steps that gain more than it are scaled "
        "increments (hybrid -> hybrid_scaled, -3.00)."
    )
    assert "RoPE on q, k" not in at_128 and "values rotated too" not in at_128
    assert at_8192.startswith(" the hybrid is +1.10 from alibi (30.10 vs 29.00; noise 0.10)")
    assert "cost more than the noise are RoPE on q, k (alibi -> rope_alibi, +1.05);" in at_8192
    assert "gain more than it are scaled increments (hybrid -> hybrid_scaled, -2.10)." in at_8192
    assert "learned free increments" not in at_8192 and "side step" not in at_8192


def test_factor_steps_with_every_step_within_the_noise():
    means = {**MEANS, "rope_alibi": MEANS["alibi"], "vorope_alibi": MEANS["alibi"]}
    means |= {s: MEANS["alibi"] for s in ("hybrid", "accrot_alibi", "hybrid_scaled")}
    verdict = factor_steps(_schemes(means))["verdict"]
    assert verdict.count("no step changes perplexity by more than the noise") == 2


@pytest.mark.parametrize(
    ("accrot_scaled", "outcome", "words"),
    [
        (35.05, "closed", "Closed: accrot_scaled is within the noise of rope, at 128, "
         "accrot_scaled - rope = +0.05 against accrot - rope = +3.00 (rope 35.00; noise 0.10)."),
        (36.0, "narrowed", "Narrowed, not closed: the gap shrank by 2.00, at 128, "
         "accrot_scaled - rope = +1.00 against accrot - rope = +3.00"),
        (37.95, "not closed", "Not closed: at 128, accrot_scaled - rope = +2.95 against "
         "accrot - rope = +3.00"),
        (34.0, "reversed", "Closed and reversed: accrot_scaled beats rope, at 128, "
         "accrot_scaled - rope = -1.00"),
    ],
)  # fmt: skip
def test_scaled_gap(accrot_scaled, outcome, words):
    means = {**MEANS, "accrot_scaled": (accrot_scaled, 37.0, 50.0)}
    result = scaled_gap(_schemes(means))
    assert result["outcome"] == outcome
    assert words in result["verdict"]
    assert "no gap to close" not in result["verdict"]


def test_scaled_gap_says_when_accrot_had_no_gap():
    means = {**MEANS, "accrot": (35.02, 40.0, 60.0)}
    result = scaled_gap(_schemes(means))
    assert result["outcome"] == "closed"
    assert (
        "accrot itself was within the noise of rope: there was no gap to close"
        in (result["verdict"])
    )


def test_gate_comparisons_beat_lose_or_do_not_separate():
    schemes = _schemes()
    fox = gate_comparison(schemes, "fox", "alibi")
    assert fox["outcome"] == "beats"
    assert fox["verdict"] == (
        "fox beats alibi: better by more than the combined spreads at every length "
        "(difference -1.00)."
    )
    path_fox = gate_comparison(schemes, "path_fox", "path_alibi")
    assert path_fox["outcome"] == "loses"
    assert path_fox["verdict"].startswith("path_fox loses to path_alibi: worse by more than")
    hybrid_fox = gate_comparison(schemes, "hybrid_fox", "hybrid_scaled")
    assert hybrid_fox["margin"] == pytest.approx({"128": 0.2, "1024": 0.2, "8192": 0.2})
    assert hybrid_fox["outcome"] == "no separable difference"
    assert hybrid_fox["verdict"] == (
        "hybrid_fox vs hybrid_scaled: no separable difference (worse at 8192; within the "
        "combined spreads at the other lengths; differences +0.00 to +1.00)."
    )
    mixed = {**MEANS, "fox": (29.5, 29.0, 29.95)}  # better at 128, worse at 8192
    verdict = gate_comparison(_schemes(mixed), "fox", "alibi")["verdict"]
    assert "no separable difference (better at 128; worse at 8192; within the combined" in verdict


def test_a_one_seed_gate_counts_the_noise_as_its_spread():
    # fox has one seed: its margin against alibi is the noise (0.1) plus alibi's spread (0.1)
    assert gate_comparison(_schemes(), "fox", "alibi")["margin"] == pytest.approx(
        {"128": 0.2, "1024": 0.2, "8192": 0.2}
    )
    # 0.15 better everywhere: beyond alibi's spread alone, not beyond it and the noise
    close = {**MEANS, "fox": (29.85, 28.85, 28.85)}
    assert gate_comparison(_schemes(close), "fox", "alibi")["outcome"] == (
        "no separable difference"
    )


def test_hybrid_variants_against_alibi_and_path_alibi():
    schemes = _schemes()
    scaled = hybrid_beats_references(schemes, "hybrid_scaled")
    # 128: min(30 - 0.1, 29.5 - 0.1) - (28 + 0.1); 1024 and 8192: min(28.9, 28.7) - 28.1
    assert scaled["margin"] == pytest.approx({"128": 1.3, "1024": 0.6, "8192": 0.6})
    assert scaled["beats"]
    assert scaled["verdict"] == (
        "hybrid_scaled: yes, beyond the seed spreads at every length (margins +0.60 to +1.30)."
    )
    fox = hybrid_beats_references(schemes, "hybrid_fox")
    assert not fox["beats"] and fox["fails"] == ["8192"]
    assert fox["verdict"] == "hybrid_fox: no, it fails at 8192 (margins -0.40 to +1.30)."
    hybrid = hybrid_beats_references(schemes, "hybrid")
    assert hybrid["fails"] == ["128", "1024", "8192"]
    assert hybrid["verdict"].startswith("hybrid: no, it fails at every length (128, 1024, 8192;")


def test_missing_runs_leave_their_questions_not_measured():
    schemes = _schemes({s: v for s, v in MEANS.items() if s != "fox"}, skip={"hybrid_scaled_seed2"})
    assert factor_steps(schemes)["verdict"] == (
        "not measured yet (missing: hybrid_scaled_seed2)"
    )  # a noise scheme
    assert scaled_gap(schemes)["verdict"] == "not measured yet (missing: hybrid_scaled_seed2)"
    assert gate_comparison(schemes, "fox", "alibi")["verdict"] == (
        "fox vs alibi: not measured yet (missing: fox, hybrid_scaled_seed2)"
    )  # fox itself, and the noise that stands for a one-seed scheme's spread
    assert "not measured" in gate_comparison(schemes, "hybrid_fox", "hybrid_scaled")["verdict"]
    # a one-seed scheme's spread is the noise, which needs every noise scheme
    assert "not measured" in gate_comparison(schemes, "path_fox", "path_alibi")["verdict"]
    assert "not measured" in hybrid_beats_references(schemes, "hybrid_scaled")["verdict"]
    assert hybrid_beats_references(schemes, "hybrid_fox")["fails"] == ["8192"]


def _write_summary(tmp_path: Path, schemes: dict) -> Path:
    machine = {
        "machine": "testbox, 2 CPU cores, TestOS",
        "hours": 7.25,
        "seconds_per_run": {"alibi": 401.0, "hybrid": 777.0},
    }
    path = tmp_path / "docs" / "ablation" / "summary.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"machine": machine, "schemes": schemes}))
    return path


def test_the_report_written_from_a_summary(tmp_path, capsys):
    summary = _write_summary(tmp_path, _schemes())
    out = tmp_path / "docs" / "ablation.md"
    assert main(["--summary", str(summary), "--out", str(out)]) == 0
    doc = out.read_text()
    assert "testbox, 2 CPU cores, TestOS; the runs recorded 7.25 h" in doc
    assert "(401-777 s per run" in doc
    assert "24 of the 24 runs of `configs/ablation/` are in the summary." in doc
    assert "](ablation/ppl_vs_length.png)" in doc
    assert "[results.md](ablation/results.md)" in doc
    # launch.study's tables, schemes in the ablation's order, spreads where there are seeds
    assert "| scheme | 128 | 1024 | 8192 |" in doc
    assert "| alibi | 30.0 ± 0.1 | 29.0 ± 0.1 | 29.0 ± 0.1 |" in doc
    assert "| fox | 29.0 | 28.0 | 28.0 |" in doc
    assert doc.index("| alibi |") < doc.index("| rope_alibi |") < doc.index("| path_fox |")
    assert "| scheme | 1024 | 8192 |" in doc  # beyond the trained length
    # the verdicts
    assert "| scaled increments | hybrid -> hybrid_scaled | -3.00 | -2.10 |" in doc
    assert "| noise | | 0.10 | 0.10 |" in doc
    assert "**Verdict.** At 128 the hybrid is +1.00 from alibi" in doc
    assert "**Verdict.** Closed: accrot_scaled is within the noise of rope" in doc
    assert "| length | fox - alibi | hybrid_fox - hybrid_scaled | path_fox - path_alibi |" in doc
    assert "| 8192 | -1.00 ± 0.20 | +1.00 ± 0.20 | +1.00 ± 0.20 |" in doc
    assert "**Verdict.** Yes where fox beats alibi." in doc
    assert "- path_fox loses to path_alibi: worse by more than" in doc
    assert "| length | hybrid | hybrid_scaled | hybrid_fox |" in doc
    assert "**Verdict.** Yes: hybrid_scaled." in doc
    assert "- hybrid_fox: no, it fails at 8192 (margins -0.40 to +1.30)." in doc
    assert "not measured" not in doc
    assert f"wrote {out}" in capsys.readouterr().out


def test_the_report_of_a_partial_summary_names_what_is_missing(tmp_path):
    schemes = _schemes({s: MEANS[s] for s in ("alibi", "rope", "accrot")}, skip={"alibi_seed2"})
    summary = _write_summary(tmp_path, schemes)
    out = tmp_path / "report.md"
    assert main(["--summary", str(summary), "--out", str(out)]) == 0
    doc = out.read_text()
    assert (
        "4 of the 24 runs of `configs/ablation/` are in the summary (missing: alibi_seed2, " in doc
    )
    assert "Seeds in the summary: alibi 2, rope 1, accrot 1." in doc
    assert "**Verdict.** Not measured yet (missing: alibi_seed2, rope_alibi, " in doc
    assert "- fox vs alibi: not measured yet (missing: fox, alibi_seed2, hybrid, " in doc
    assert "**Verdict.** Not all measured yet; none does so far." in doc
    assert "| length |" not in doc  # no comparison has its runs
    assert "](docs/ablation/ppl_vs_length.png)" in doc
    # nothing measured at all
    empty = tmp_path / "empty" / "summary.json"
    empty.parent.mkdir()
    empty.write_text(json.dumps({"machine": {}, "schemes": {}}))
    assert main(["--summary", str(empty), "--out", str(out)]) == 0
    assert "No run is in the summary yet." in out.read_text()
    assert "0 of the 24 runs" in out.read_text()


def test_without_a_summary_it_says_how_to_make_one(tmp_path, capsys):
    assert main(["--summary", str(tmp_path / "none.json"), "--out", str(tmp_path / "a.md")]) == 2
    assert "python -m launch.study configs/ablation --out docs/ablation" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("[1, 2")
    assert main(["--summary", str(tmp_path / "bad.json"), "--out", str(tmp_path / "a.md")]) == 2
    assert not (tmp_path / "a.md").exists()
