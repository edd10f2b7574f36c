"""What a checkpoint must be before anything loads it: a manifest with every key and every
file of its layout, nothing unlisted in its directory, finite weights for export, generation
and evaluation; checkpoints none of which verify stop the run (or are moved aside, never
destroyed); symbolic links to checkpoints are pruned; lm-eval reuses only the export of the
very checkpoint; generate's and export's bad arguments are one line.

One run trained once (12 steps, checkpoints at 4, 8, 12), copied by every test that changes it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from evaluation import evaluate as evaluation_targets
from launch import evaluate, export, generate
from training import checkpoint as ckpt
from training import export as exports
from training.config import load_config
from training.resume import resume_point
from training.trainer import EXIT_BAD_INPUT

ROOT = Path(__file__).resolve().parents[2]
OPTIM = "zero_pp_rank_0_mp_rank_00_optim_states.pt"


def _args(run_dir: Path, dataset: Path, *extra: str) -> list[str]:
    return [
        "configs/tiny.yaml",
        "eval.every_checkpoint=false",
        f"run.dir={run_dir.parent}",
        f"run.name={run_dir.name}",
        f"data.path={dataset}",
        "data.seq_len=32",
        "data.batch_size=2",
        "train.max_steps=12",
        "train.checkpoint_every=4",
        "train.warmup_steps=1",
        "train.log_every=1",
        *extra,
    ]


def _train(run_dir: Path, dataset: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "launch.train", *_args(run_dir, dataset, *extra)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def base(stdlib_dataset, tmp_path_factory) -> Path:
    """The tiny model trained 12 steps on one rank, checkpoints at 4, 8 and 12."""
    run_dir = tmp_path_factory.mktemp("integrity") / "base"
    done = _train(run_dir, stdlib_dataset)
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


def _copy(base: Path, parent: Path) -> Path:
    """A copy of the run under `parent`, of the same name (run.name)."""
    parent.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copytree(base, parent / base.name, symlinks=True))


def _step(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step}"


def _manifest(directory: Path) -> dict:
    return json.loads((directory / ckpt.MANIFEST).read_text())


def _rehash(directory: Path, **changes) -> None:
    """Rewrite a checkpoint's manifest for the files it holds now (as a save would have)."""
    manifest = _manifest(directory)
    manifest["files"] = {
        name: {"bytes": (directory / name).stat().st_size, "sha256": ckpt.sha256(directory / name)}
        for name in ckpt._files(directory)
    }
    (directory / ckpt.MANIFEST).write_text(json.dumps({**manifest, **changes}))


def _poison(directory: Path, *, finite_flag: bool = False) -> None:
    """NaN in the fp32 weights ZeRO-3 saved (which zero_to_fp32 consolidates), the manifest
    rewritten to match, saying `finite: finite_flag`."""
    path = directory / OPTIM
    state = torch.load(path, weights_only=False)
    for group in state["optimizer_state_dict"]["fp32_flat_groups"]:
        group.data.fill_(float("nan"))
    torch.save(state, path)
    _rehash(directory, finite=finite_flag)


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def _one_error_line(err: str) -> str:
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
    return errors[0]


@pytest.fixture()
def nf(base, tmp_path) -> Path:
    """A copy of the run whose step 12 weights hold NaN (its manifest: finite false)."""
    run_dir = _copy(base, tmp_path / "nf")
    _poison(_step(run_dir, 12))
    return run_dir


# ---------------------------------------------------------------- manifests (items 3 and 7)


def test_a_manifest_must_list_every_file_of_its_layout_and_the_directory_nothing_more(
    base, tmp_path, caplog
):
    """A manifest listing no files, with an older checkpoint's optimizer state copied in, was
    complete and verified (nothing to check): resumed. Now it lacks its layout's files; and a
    file the manifest does not list makes the checkpoint incomplete."""
    run_dir = _copy(base, tmp_path)
    step_12, step_8 = _step(run_dir, 12), _step(run_dir, 8)
    shutil.copy(_step(run_dir, 4) / OPTIM, step_12 / OPTIM)
    (step_12 / ckpt.MANIFEST).write_text(json.dumps({**_manifest(step_12), "files": {}}))
    extra = step_8 / "zero_pp_rank_1_mp_rank_00_optim_states.pt"  # not saved with step 8
    shutil.copy(_step(run_dir, 4) / OPTIM, extra)
    with caplog.at_level("WARNING", logger="rotalibi"):
        found = ckpt.find_checkpoints(run_dir / "checkpoints")
    assert [c.step for c in found] == [4]
    assert "step_12: malformed manifest (it does not list trainer_rank_0.pt" in caplog.text
    assert f"step_8: {extra.name} is not in the manifest" in caplog.text

    extra.unlink()
    cfg = load_config(ROOT / "configs/tiny.yaml", _args(run_dir, Path("unused"))[1:])
    assert resume_point(cfg, 1).step == 8


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (lambda m: {"step": 12, "files": {}}, "malformed manifest (no 'finite')"),
        (lambda m: {**m, "config": 5}, "malformed manifest ('config' is not str)"),
        (lambda m: {**m, "world_size": True}, "malformed manifest ('world_size' is not int)"),
        (lambda m: {**m, "hooks_owed": "no"}, "malformed manifest ('hooks_owed' is not bool)"),
        (
            lambda m: {**m, "config": "model: {}\ndata: {path: x}\n"},
            "malformed manifest (its config has no data.seq_len of type int)",
        ),
        (lambda m: {**m, "config": "a: [b"}, "malformed manifest (its config is not YAML"),
        (lambda m: {**m, "step": 8}, "malformed manifest (of step 8, in step_12)"),
        (
            lambda m: {**m, "world_size": 2},
            "malformed manifest (it does not list trainer_rank_1.pt",
        ),
    ],
)
def test_a_manifest_missing_keys_or_of_wrong_types_is_skipped_for_the_previous_one(
    base, tmp_path, caplog, change, why
):
    """`{"step": 12, "files": {}}` ended the run with KeyError: 'config' before step 8 was
    tried; every key and type is checked, and such a checkpoint is skipped with a warning."""
    run_dir = _copy(base, tmp_path)
    step_12 = _step(run_dir, 12)
    (step_12 / ckpt.MANIFEST).write_text(json.dumps(change(_manifest(step_12))))
    cfg = load_config(ROOT / "configs/tiny.yaml", _args(run_dir, Path("unused"))[1:])
    with caplog.at_level("WARNING", logger="rotalibi"):
        assert resume_point(cfg, 1).step == 8
    assert f"skipping checkpoint {step_12}: {why}" in caplog.text


# ---------------------------------------------------------------- nothing verifies (item 4)


def test_a_run_none_of_whose_checkpoints_verify_stops_and_restarts_only_when_told(
    base, stdlib_dataset, tmp_path
):
    """Truncated, altered and non-finite: the run used to warn, train from step 0 (exit 0),
    truncate metrics.jsonl and overwrite the checkpoints. Now it stops in one line naming them
    (exit 2) with everything as it was; train.restart_if_unverified=true moves them to
    RUN/unverified/ intact and trains from step 0."""
    run_dir = _copy(base, tmp_path)
    step_4, step_8, step_12 = (_step(run_dir, s) for s in (4, 8, 12))
    with (step_4 / OPTIM).open("r+b") as f:
        f.truncate(1000)
    size = (step_8 / OPTIM).stat().st_size
    (step_8 / OPTIM).write_bytes(bytes(size))  # same size, other bytes
    _poison(step_12)
    before = {"checkpoints": _snapshot(run_dir / "checkpoints")}
    before["metrics"] = (run_dir / "metrics.jsonl").read_bytes()

    done = _train(run_dir, stdlib_dataset, "train.max_steps=16")
    assert done.returncode == EXIT_BAD_INPUT, done.stderr[-3000:]
    error = _one_error_line(done.stderr)
    assert f"no checkpoint of {run_dir} can be resumed" in error
    assert f"step_4 ({OPTIM} has 1000 bytes" in error
    assert f"step_8 ({OPTIM} is not the file that was saved" in error
    assert "step_12 (its weights are not finite)" in error
    assert "train.restart_if_unverified=true" in error
    assert _snapshot(run_dir / "checkpoints") == before["checkpoints"]
    assert (run_dir / "metrics.jsonl").read_bytes() == before["metrics"]

    done = _train(run_dir, stdlib_dataset, "train.max_steps=4", "train.restart_if_unverified=true")
    assert done.returncode == 0, done.stderr[-3000:]
    aside = run_dir / "unverified"
    assert f"moved step_4, step_8, step_12 to {aside}" in done.stderr
    assert "steps 0 -> 4 of 4" in done.stderr
    moved = {name: data for name, data in before["checkpoints"].items() if name.startswith("step_")}
    assert _snapshot(aside) == {**moved, "metrics.jsonl": before["metrics"]}
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [c.step for c in ckpt.find_checkpoints(run_dir / "checkpoints")] == [4]


# ---------------------------------------------------------------- non-finite weights (item 5)


def test_export_generate_and_evaluate_refuse_a_non_finite_checkpoint(nf, capsys):
    """They read the manifest's `finite` flag only on resume: export wrote NaN, generate failed
    in sampling, evaluate wrote a NaN step_12.json and failed in the plot. Each refuses it in
    one line (exit 2), asked for as the newest or by --step, naming the newest finite one."""
    capsys.readouterr()
    expected = f"checkpoint {_step(nf, 12)} has non-finite weights"
    runs = {
        "export": lambda *a: export.main([str(nf), "--hf", *a]),
        "generate": lambda *a: generate.main([str(nf), "--prompt", "def", *a]),
        "evaluate": lambda *a: evaluate.main([str(nf), "eval.lengths=[32,64]", *a]),
    }
    for name, run in runs.items():
        for step in ([], ["--step", "12"]):
            assert run(*step) == 2, name
            error = capsys.readouterr().err.strip()
            assert error.count("\n") == 0, error
            assert expected in error and "the newest with finite weights is step_8" in error
            assert "pass --step 8" in error
    checkpoint_dir = str(_step(nf, 12))
    assert evaluate.main([checkpoint_dir, "eval.lengths=[32,64]"]) == 2
    assert expected in capsys.readouterr().err
    assert not (nf / "export").exists() and not (nf / "eval").exists()
    # --all evaluates the finite ones only, naming the other.
    _, _, targets = evaluation_targets.resolve(nf, step=None, every=True)
    assert [t.step for t in targets] == [4, 8]


def test_weights_that_are_not_finite_are_refused_whatever_the_manifest_says(base, tmp_path):
    run_dir = _copy(base, tmp_path)
    _poison(_step(run_dir, 12), finite_flag=True)  # a manifest that says finite
    checkpoint = exports.pick_checkpoint(run_dir, 12)
    with pytest.raises(exports.ExportError, match=r"step_12 holds non-finite weights \("):
        exports.export(checkpoint, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- lm-eval's export (item 6)


def _nan_export(out: Path) -> None:
    """Make the export at `out` hold NaN weights, as a stale export of a diverged run does."""
    weights = load_file(out / "model.safetensors")
    save_file({name: torch.full_like(t, float("nan")) for name, t in weights.items()},
              out / "model.safetensors", metadata={"format": "pt"})  # fmt: skip


def test_lm_eval_reuses_only_an_export_made_from_that_very_checkpoint(base, tmp_path):
    """A stale export of step 12 (NaN weights, from before the run was redone) was reused
    unchecked: a healthy checkpoint reported NaN, exit 0. An export is reused only when its
    record names this checkpoint's manifest and its weights are those exported."""
    from evaluation import harness
    from launch import lm_eval

    run_dir = _copy(base, tmp_path)
    step_8, step_12 = (exports.pick_checkpoint(run_dir, s) for s in (8, 12))
    out = run_dir / "export" / "hf_step_12"
    exports.export_hf(step_12, out)
    expected = load_file(out / "model.safetensors")
    _nan_export(out)
    (out / "rotalibi_export.json").unlink(missing_ok=True)  # exported by an older rotalibi

    assert lm_eval.main([str(run_dir), "--limit", "2"]) == 0
    results = json.loads((run_dir / "eval" / "lm_eval" / "step_12.json").read_text())
    assert math.isfinite(results["results"]["rotalibi_heldout"]["bits_per_byte,none"])

    def weights_of_step_12_after_hf_export() -> None:
        assert harness.hf_export(step_12, out) == out
        for name, value in load_file(out / "model.safetensors").items():
            assert torch.equal(value, expected[name]), name

    weights_of_step_12_after_hf_export()  # re-exported by harness.main
    record = json.loads((out / exports.EXPORT_RECORD).read_text())
    assert record["step"] == 12 and record["source"] == str(step_12.path)

    exports.export_hf(step_8, out)  # another checkpoint's export, with its record
    weights_of_step_12_after_hf_export()
    _nan_export(out)  # weights altered after the export
    weights_of_step_12_after_hf_export()

    before = (out / "model.safetensors").stat()  # intact: reused as it is
    weights_of_step_12_after_hf_export()
    after = (out / "model.safetensors").stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert sorted(p.name for p in out.parent.iterdir()) == ["hf_step_12"]  # no leftovers


# ---------------------------------------------------------------- symbolic links (item 8)


def _move_to_other_disk(directory: Path, disk: Path) -> Path:
    disk.mkdir(parents=True, exist_ok=True)
    target = Path(shutil.move(str(directory), str(disk / directory.name)))
    directory.symlink_to(target, target_is_directory=True)
    return target


def test_prune_removes_links_and_only_targets_that_are_this_runs_checkpoints(
    base, tmp_path, caplog
):
    """Pruning a checkpoint moved to another disk behind a link crashed every save (rmtree on
    a symbolic link). The link goes; its target too when it is this run's checkpoint of that
    step, else it stays, with a warning."""
    run_dir = _copy(base, tmp_path / "run")
    checkpoints = run_dir / "checkpoints"
    own = _move_to_other_disk(checkpoints / "step_4", tmp_path / "disk")
    foreign = _move_to_other_disk(checkpoints / "step_8", tmp_path / "disk2")
    manifest = _manifest(foreign)
    config = manifest["config"].replace("name: base\n", "name: another\n", 1)
    (foreign / ckpt.MANIFEST).write_text(json.dumps({**manifest, "config": config}))
    assert [c.step for c in ckpt.find_checkpoints(checkpoints)] == [4, 8, 12]

    with caplog.at_level("WARNING", logger="rotalibi"):
        ckpt.prune(checkpoints, keep=1)
    assert sorted(p.name for p in checkpoints.iterdir() if p.name.startswith("step_")) == [
        "step_12"
    ]
    assert not own.exists() and foreign.is_dir()
    assert f"pruned the link {checkpoints / 'step_8'}; its target {foreign}" in caplog.text


def test_training_resumes_past_a_keyless_manifest_and_prunes_linked_checkpoints(
    base, stdlib_dataset, tmp_path
):
    """As launch.train runs: step 12's manifest `{"step": 12, "files": {}}` (KeyError before)
    is skipped for step 8, and the saves at 12 and 16 prune step 4, a link to another disk
    (an OSError at every save before)."""
    run_dir = _copy(base, tmp_path / "run")
    step_12 = _step(run_dir, 12)
    (step_12 / ckpt.MANIFEST).write_text(json.dumps({"step": 12, "files": {}}))
    target = _move_to_other_disk(_step(run_dir, 4), tmp_path / "disk")
    done = _train(run_dir, stdlib_dataset, "train.max_steps=16", "train.keep_checkpoints=2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed from {_step(run_dir, 8)} (step 8)" in done.stderr
    assert f"skipping checkpoint {step_12}: malformed manifest (no 'finite')" in done.stderr
    found = ckpt.find_checkpoints(run_dir / "checkpoints")
    assert [c.step for c in found] == [12, 16]
    assert not _step(run_dir, 4).is_symlink() and not target.exists()


# ---------------------------------------------------------------- bad arguments (items 17, 18)


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--prompt", "def \udcff\udcfe("], "--prompt is not valid UTF-8 (bytes ff fe at"),
        (["--prompt", "def", "--temperature", "1e-320"], "--temperature must be 0 (greedy) or"),
    ],
)
def test_generate_refuses_undecodable_prompts_and_vanishing_temperatures(
    base, capsys, option, message
):
    """A prompt of bytes that are not UTF-8 (argv's surrogate escapes) failed in the tokenizer
    (TypeError), --temperature 1e-320 in sampling; both are one line, exit 2."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        generate.main([str(base), *option])
    assert stop.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and error.startswith("error: ") and message in error


def test_generate_takes_undecodable_bytes_from_argv_as_one_line(base):
    """The same from a real command line, whose bytes Python decodes with surrogate escapes."""
    done = subprocess.run(
        [sys.executable, "-m", "launch.generate", str(base), "--prompt", b"def \xff("],
        cwd=ROOT,
        capture_output=True,
        timeout=600,
        env={**os.environ, "LC_ALL": "C.UTF-8"},
    )
    assert done.returncode == 2
    assert (
        done.stderr.decode()
        .strip()
        .splitlines()[-1]
        .startswith("error: --prompt is not valid UTF-8 (bytes ff at character 4)")
    )


def test_export_to_a_file_is_one_line_and_writes_nothing(base, tmp_path, capsys):
    run_dir = _copy(base, tmp_path / "run")
    blocker = tmp_path / "taken"
    blocker.write_text("mine")
    capsys.readouterr()
    for form in ([], ["--hf"]):
        for out in (blocker, blocker / "below"):
            assert export.main([str(run_dir), "--out", str(out), *form]) == 2
            error = capsys.readouterr().err.strip()
            assert error == f"error: --out {out}: {blocker} is a file, not a directory"
    assert blocker.read_text() == "mine" and not (run_dir / "export").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "taken"]
