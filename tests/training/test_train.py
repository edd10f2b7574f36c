"""launch.train end to end on a real dataset: exact resumption after SIGTERM (1 and 2 ranks),
resumption on another number of ranks (DeepSpeed's universal checkpoint), truncated
checkpoints, metrics.jsonl and TensorBoard, bad input, one run per directory, Ctrl-C, and a run
directory that is read-only or fills up."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import EVAL_ARGS
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tiny_runs import TORCHRUN, tiny_run_args
from tracker_records import mlflow_history, wandb_history

from launch.evaluate import main as evaluate_main
from training import checkpoint as ckpt
from training.export import export
from training.rundir import LOCK_FILE
from training.trainer import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_REQUEUE

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
STEPS = 40
TB_TAGS = {
    "train/loss",
    "train/lr",
    "train/grad_norm",
    "train/tokens_per_s",
    "train/mfu",
    "train/step_time",
    "train/data_wait_fraction",
    "train/memory_gb",
    "train/documents_per_batch",
}


def _args(run_dir: Path, dataset: Path, *extra: str) -> list[str]:
    return tiny_run_args(
        run_dir,
        dataset,
        f"train.max_steps={STEPS}",
        "train.checkpoint_every=20",
        "train.log_every=1",
        "train.warmup_steps=4",
        "eval.every_checkpoint=false",
        *extra,
    )


def _rank_env(rank: int, world: int, port: int) -> dict[str, str]:
    """What srun-like launchers give each process."""
    return {
        **os.environ,
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(world),
        "LOCAL_WORLD_SIZE": str(world),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }


def _start(args: list[str], world: int = 1, port: int = 29611) -> list[subprocess.Popen]:
    cmd = [sys.executable, "-m", "launch.train", *args]
    env = [_rank_env(r, world, port) for r in range(world)] if world > 1 else [dict(os.environ)]
    return [
        subprocess.Popen(
            cmd, cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for e in env
    ]


def _finish(procs: list[subprocess.Popen]) -> list[tuple[int, str]]:
    return [(p.wait(timeout=600), p.communicate()[1]) for p in procs]


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in _records(run_dir) if "loss" in r]


def _interrupt(procs: list[subprocess.Popen], run_dir: Path, victim: int, after_step: int) -> None:
    """SIGTERM to one process once metrics.jsonl shows `after_step` steps."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        path = run_dir / "metrics.jsonl"
        if path.exists() and len(path.read_text().splitlines()) >= after_step:
            procs[victim].send_signal(signal.SIGTERM)
            return
        assert all(p.poll() is None for p in procs), "training ended before the signal"
        time.sleep(0.05)
    pytest.fail("training never reached the step to interrupt at")


@pytest.fixture(scope="module")
def uninterrupted(stdlib_dataset, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "straight"
    profiled = "train.profile={start: 3, steps: 2}"  # changes no number (same losses resumed)
    [(code, err)] = _finish(_start(_args(run_dir, stdlib_dataset, profiled)))
    assert code == 0, err[-3000:]
    return run_dir


def test_profile_writes_a_chrome_trace_naming_the_attention(uninterrupted):
    [trace] = (uninterrupted / "profile").glob("rank0.*.pt.trace.json")
    events = json.loads(trace.read_text())["traceEvents"]
    spans = [e for e in events if e.get("ph") == "X"]
    names = {e["name"] for e in spans}
    assert "rotalibi.attention" in names and "aten::mm" in names
    attention = [e for e in spans if e["name"] == "rotalibi.attention"]
    assert len(attention) == 2 * 2  # two profiled steps x the tiny model's two layers


def test_sigterm_saves_exits_75_and_resumes_to_the_same_losses(
    uninterrupted, stdlib_dataset, tmp_path
):
    run_dir = tmp_path / "interrupted"
    procs = _start(_args(run_dir, stdlib_dataset))
    _interrupt(procs, run_dir, victim=0, after_step=5)
    [(code, err)] = _finish(procs)
    assert code == EXIT_REQUEUE, err[-3000:]
    saved = int((run_dir / "checkpoints" / "latest").read_text().removeprefix("step_"))
    assert 5 <= saved < STEPS and f"saved {run_dir / 'checkpoints' / f'step_{saved}'}" in err

    [(code, err)] = _finish(_start(_args(run_dir, stdlib_dataset)))
    assert code == 0, err[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{saved}'} (step {saved})" in err
    # Bitwise: float32 on the CPU is deterministic, and JSON keeps every bit of a float.
    assert _losses(run_dir) == _losses(uninterrupted)
    assert [step for step, _ in _losses(run_dir)] == list(range(1, STEPS + 1))

    # A truncated checkpoint is skipped with a warning; the run resumes from the one before.
    (run_dir / "checkpoints" / "step_40" / "trainer_rank_0.pt").write_bytes(b"")
    [(code, err)] = _finish(_start(_args(run_dir, stdlib_dataset, f"train.max_steps={STEPS}")))
    assert code == 0, err[-3000:]
    assert "skipping checkpoint" in err and "step_40: trainer_rank_0.pt has 0 bytes" in err
    assert "(step 20)" in err
    assert _losses(run_dir) == _losses(uninterrupted)


def test_a_signal_on_a_checkpoint_step_defers_its_evaluation_to_the_resumed_run(
    stdlib_dataset, tmp_path, monkeypatch
):
    """Every step is a checkpoint step: the signalled one is saved without its evaluation,
    which the next start runs before it trains on; no step's evaluation is lost. W&B
    (offline) and MLflow continue their runs and record each value once; the resumed run
    ends with its summary."""
    run_dir, steps = tmp_path / "deferred", 6
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    args = _args(
        run_dir,
        stdlib_dataset,
        f"train.max_steps={steps}",
        "train.checkpoint_every=1",
        "train.keep_checkpoints=10",
        "eval.every_checkpoint=true",
        "eval.lengths=[128]",
        "eval.windows=1",
        "train.loggers=[tensorboard,jsonl,wandb,mlflow]",
    )
    procs = _start(args)
    _interrupt(procs, run_dir, victim=0, after_step=2)
    [(code, err)] = _finish(procs)
    assert code == EXIT_REQUEUE, err[-3000:]
    saved = int((run_dir / "checkpoints" / "latest").read_text().removeprefix("step_"))
    evaluated = sorted(int(p.stem.removeprefix("step_")) for p in (run_dir / "eval").glob("*.json"))
    assert evaluated == list(range(1, saved))

    [(code, err)] = _finish(_start(args))
    assert code == 0, err[-3000:]
    assert f"running the hooks of step {saved}, deferred by a stop signal" in err
    evaluated = sorted(int(p.stem.removeprefix("step_")) for p in (run_dir / "eval").glob("*.json"))
    assert evaluated == list(range(1, steps + 1))
    logged = [r["step"] for r in _records(run_dir) if "extrap/ppl@128" in r]
    assert logged == list(range(1, steps + 1))
    assert f"run deferred: finished\n  steps {saved} -> {steps} of {steps}" in err
    assert f"perplexity at step {steps} (trained at 64)" in err and "128 tokens:" in err

    # Both trackers hold exactly metrics.jsonl's values (training and extrap/*), each once.
    expected = sorted(
        (r["step"], key if "/" in key else f"train/{key}", value)
        for r in _records(run_dir)
        for key, value in r.items()
        if key != "step" and isinstance(value, int | float)
    )
    scalars = [e for e in wandb_history(run_dir) if e[1] != "extrap/ppl_vs_length"]
    assert sorted(scalars) == expected
    ids = json.loads((run_dir / "trackers.json").read_text())
    renamed = sorted((s, k.replace("@", ":"), v) for s, k, v in expected)
    uri = (tmp_path / "mlruns").as_uri()
    assert sorted(mlflow_history(uri, ids["mlflow"]["id"])) == renamed


@pytest.fixture(scope="module")
def uninterrupted_two_ranks(stdlib_dataset, tmp_path_factory) -> Path:
    """The same run on 2 ranks, started by torchrun."""
    run_dir = tmp_path_factory.mktemp("runs") / "straight2"
    done = _run([*TORCHRUN, "2", "-m", "launch.train", *_args(run_dir, stdlib_dataset)])
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


def test_two_ranks_resume_exactly_when_one_rank_is_signalled(
    uninterrupted_two_ranks, stdlib_dataset, tmp_path
):
    """srun-like processes for the interrupted run, where only rank 1 gets SIGTERM and both
    ranks must still save and exit together."""
    straight = uninterrupted_two_ranks
    run_dir = tmp_path / "interrupted2"
    procs = _start(_args(run_dir, stdlib_dataset), world=2)
    _interrupt(procs, run_dir, victim=1, after_step=5)
    codes = _finish(procs)
    assert [code for code, _ in codes] == [EXIT_REQUEUE, EXIT_REQUEUE], codes[0][1][-3000:]
    resumed = _finish(_start(_args(run_dir, stdlib_dataset), world=2, port=29612))
    assert [code for code, _ in resumed] == [0, 0], resumed[0][1][-3000:]
    assert _losses(run_dir) == _losses(straight)


SEQUENCE_PARALLEL = ("train.sequence_parallel=2", "eval.every_checkpoint=true", *EVAL_ARGS)


@pytest.fixture(scope="module")
def sequence_parallel_run(stdlib_dataset, tmp_path_factory) -> Path:
    """train.sequence_parallel=2 on 2 ranks, each holding half of every sequence (documents
    cross the boundary), evaluated at its checkpoints (steps 20 and 40)."""
    run_dir = tmp_path_factory.mktemp("runs") / "sp_straight"
    args = _args(run_dir, stdlib_dataset, *SEQUENCE_PARALLEL)
    done = _run([*TORCHRUN, "2", "-m", "launch.train", *args])
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


def test_sequence_parallel_trains_as_one_rank_evaluates_and_resumes_exactly(
    sequence_parallel_run, uninterrupted, stdlib_dataset, tmp_path
):
    """The first 20 steps' losses equal one rank's with the same global batch within 1e-5
    relative (later, Adam amplifies the float32 rounding of a differently ordered sum: 1e-3 by
    step 40); each checkpoint is evaluated; a run stopped by SIGTERM resumes to exactly the
    uninterrupted one's losses."""
    straight = sequence_parallel_run
    one, two = dict(_losses(uninterrupted)), dict(_losses(straight))
    assert list(two) == list(one) == list(range(1, STEPS + 1))
    for step in range(1, 21):
        assert two[step] == pytest.approx(one[step], rel=1e-5), step
    records: dict[int, dict] = {}  # a step's training and evaluation records, merged
    for record in _records(straight):
        records.setdefault(record["step"], {}).update(record)
    assert records[STEPS]["tokens"] == STEPS * 4 * 64  # one sequence-parallel group
    for step in (20, STEPS):
        assert (
            "extrap/ppl@256" in records[step]
            and (straight / "eval" / f"step_{step}.json").is_file()
        )

    run_dir = tmp_path / "sp_interrupted"
    args = _args(run_dir, stdlib_dataset, *SEQUENCE_PARALLEL)
    procs = _start(args, world=2, port=29615)
    _interrupt(procs, run_dir, victim=0, after_step=10)
    codes = _finish(procs)
    assert [code for code, _ in codes] == [EXIT_REQUEUE, EXIT_REQUEUE], codes[0][1][-3000:]
    resumed = _finish(_start(args, world=2, port=29616))
    assert [code for code, _ in resumed] == [0, 0], resumed[0][1][-3000:]
    assert _losses(run_dir) == _losses(straight)


def test_a_sequence_parallel_run_resumes_on_one_rank_without_it(
    sequence_parallel_run, stdlib_dataset, tmp_path
):
    """Saved by 2 ranks sharing each sequence (one data-parallel group), resumed on 1 rank
    holding whole sequences through the universal checkpoint: the global batch is the same 4
    rows, read from the group's data position, so steps 21-40 give the saved run's losses."""
    run_dir = _stopped_at_20(sequence_parallel_run, tmp_path, "sp_resumed")
    [(code, err)] = _finish(_start(_args(run_dir, stdlib_dataset)))
    assert code == 0, err[-3000:]
    assert "saved by 2 rank(s), on 1, train.sequence_parallel 2 -> 1" in err
    resumed, expected = dict(_losses(run_dir)), dict(_losses(sequence_parallel_run))
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(21, STEPS + 1):
        assert resumed[step] == pytest.approx(expected[step], rel=1e-4), step


def _run(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)


def _stopped_at_20(straight: Path, tmp_path: Path, name: str) -> Path:
    """A copy of the finished run `straight` as it was at step 20 (its checkpoint)."""
    run_dir = tmp_path / name
    shutil.copytree(straight, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "step_40")
    (run_dir / "checkpoints" / "latest").write_text("step_20")
    return run_dir


def _loaded_state(ranks: int, args: list[str], out: Path) -> dict:
    """Every parameter's weights and Adam moments as a resume on `ranks` ranks loads them."""
    done = _run([*TORCHRUN, str(ranks), "tests/helpers/resume_state_worker.py", str(out), *args])
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out, weights_only=True)


def test_a_two_rank_run_resumes_on_one_rank_with_the_same_weights_and_batches(
    uninterrupted_two_ranks, stdlib_dataset, tmp_path
):
    """Through DeepSpeed's universal checkpoint: the weights and Adam moments the 2 ranks
    saved, and, the global batch kept by train.grad_accum=2, the same rows at every step (the
    one rank serves both saved ranks' data in turn), so the uninterrupted run's losses."""
    run_dir = _stopped_at_20(uninterrupted_two_ranks, tmp_path, "resumed")

    # The global batch would halve: one line with the fix, before any work.
    [(code, err)] = _finish(_start(_args(run_dir, stdlib_dataset)))
    assert code == EXIT_BAD_INPUT, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "saved with a global batch of 8 rows" in errors[0]
    assert "set train.grad_accum=2 to keep it" in errors[0] and "Traceback" not in err
    assert not (run_dir / "checkpoints" / "step_20" / "universal").exists()

    # As loaded on 1 rank: the weights that DeepSpeed's zero_to_fp32 consolidates from the 2
    # ranks' partitions, bit for bit, and the Adam moments that its universal conversion
    # gathered from them.
    args = _args(run_dir, stdlib_dataset, "train.grad_accum=2")
    loaded = _loaded_state(1, args, tmp_path / "one.pt")
    checkpoint = run_dir / "checkpoints" / "step_20"
    saved = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
    assert loaded["step"] == 20 and loaded["state"].keys() <= saved.keys()  # saved: tied too
    for name, state in loaded["state"].items():
        assert torch.equal(state["fp32"], saved[name]), name
        for moment in ("exp_avg", "exp_avg_sq"):
            gathered = torch.load(checkpoint / "universal" / "zero" / name / f"{moment}.pt")
            torch.testing.assert_close(state[moment].flatten(), gathered, rtol=0, atol=1e-7)

    [(code, err)] = _finish(_start(args))
    assert code == 0, err[-3000:]
    assert "saved by 2 rank(s), on 1" in err
    resumed, expected = dict(_losses(run_dir)), dict(_losses(uninterrupted_two_ranks))
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(21, STEPS + 1):
        assert resumed[step] == pytest.approx(expected[step], rel=1e-4), step

    # Its checkpoints export and evaluate as any run's.
    export(ckpt.find_checkpoints(run_dir / "checkpoints")[-1], tmp_path / "export")
    assert (tmp_path / "export" / "model.safetensors").is_file()
    assert evaluate_main([str(run_dir), *EVAL_ARGS]) == 0
    assert (run_dir / "eval" / f"step_{STEPS}.json").is_file()


def test_a_one_rank_run_resumes_on_two_ranks_and_evaluates(uninterrupted, stdlib_dataset, tmp_path):
    """Each of the 2 ranks serves every other row of the saved rank's data (the epoch is
    still read once: test_data_loader counts it), so the first step after the resume trains
    on the 1-rank run's rows; training, checkpoints and evaluation go on."""
    run_dir = _stopped_at_20(uninterrupted, tmp_path, "resumed2")
    args = _args(run_dir, stdlib_dataset, "data.batch_size=2", "eval.every_checkpoint=true")
    done = _run([*TORCHRUN, "2", "-m", "launch.train", *args, *EVAL_ARGS])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "saved by 1 rank(s), on 2" in done.stderr
    resumed, expected = dict(_losses(run_dir)), dict(_losses(uninterrupted))
    assert sorted(resumed) == list(range(1, STEPS + 1))
    assert resumed[21] == pytest.approx(expected[21], rel=1e-6)
    assert (run_dir / "eval" / f"step_{STEPS}.json").is_file()


def test_metrics_and_tensorboard_hold_every_logged_step(uninterrupted):
    records = _records(uninterrupted)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    first, last = records[0], records[-1]
    assert last["tokens"] == STEPS * 4 * 64
    assert last["loss"] < first["loss"] - 1.0
    for r in records:
        assert r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 and 0 <= r["data_wait_fraction"] < 1
        assert 1 <= r["documents_per_batch"] <= 2 * 4  # 4 rows: at most two documents a row
    assert first["lr"] == pytest.approx(3e-3 / 4)  # warmup: (step + 1) / 4 of the peak

    events = EventAccumulator(str(uninterrupted / "tb"))
    events.Reload()
    assert set(events.Tags()["scalars"]) >= TB_TAGS
    logged = events.Scalars("train/loss")
    assert [e.step for e in logged] == list(range(1, STEPS + 1))
    for event, record in zip(logged, records, strict=True):
        assert event.value == pytest.approx(record["loss"], rel=1e-6)


def test_bad_input_stops_before_any_work(uninterrupted, stdlib_dataset, tmp_path):
    foreign = tmp_path / "foreign"
    shutil.copytree(uninterrupted, foreign)
    # Each start stops before it locks or writes anything: they run side by side.
    starts = {
        "typo": _start(_args(tmp_path / "bad", stdlib_dataset, "model.schem=rope")),
        "no data": _start(_args(tmp_path / "bad", stdlib_dataset, f"data.path={tmp_path / 'x'}")),
        "vocab": _start(_args(tmp_path / "bad", stdlib_dataset, "model.vocab_size=100")),
        "foreign": _start(_args(foreign, stdlib_dataset, "model.scheme=rope")),
        "heads": _start(_args(tmp_path / "bad", stdlib_dataset, "train.sequence_parallel=3")),
        "ranks": _start(_args(tmp_path / "bad", stdlib_dataset, "train.sequence_parallel=2")),
    }
    [(code, err)] = _finish(starts["typo"])
    assert code == EXIT_BAD_INPUT and "did you mean 'model.scheme'" in err
    [(code, err)] = _finish(starts["no data"])
    assert code == EXIT_BAD_INPUT and "make data" in err
    [(code, err)] = _finish(starts["vocab"])
    assert code == EXIT_BAD_INPUT and "set model.vocab_size=512" in err
    [(code, err)] = _finish(starts["heads"])
    assert code == EXIT_BAD_INPUT and "init_process_group" not in err
    for what in ("data.seq_len=64", "model.n_heads=4", "model.n_kv_heads=4"):
        assert f"train.sequence_parallel=3 does not divide {what}" in err
    [(code, err)] = _finish(starts["ranks"])  # alone, without a launcher: one rank
    assert code == EXIT_BAD_INPUT
    assert err.strip().splitlines()[-1] == (
        "error: train.sequence_parallel=2 does not divide the 1 rank(s) of this job"
    )
    assert not (tmp_path / "bad").exists()
    [(code, err)] = _finish(starts["foreign"])
    assert code == EXIT_BAD_INPUT
    assert "holds checkpoints of a different model (model.scheme: 'hybrid' -> 'rope')" in err

    # The CPU attention's tile is not the model: a changed one resumes, with a warning.
    [(code, err)] = _finish(_start(_args(foreign, stdlib_dataset, "model.attn_block=32")))
    assert code == 0 and "changed config: model.attn_block: 64 -> 32" in err, err[-3000:]


def _wait_for_steps(run_dir: Path, steps: int, procs: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + 300
    path = run_dir / "metrics.jsonl"
    while not (path.exists() and len(path.read_text().splitlines()) >= steps):
        assert all(p.poll() is None for p in procs), "training ended early"
        assert time.monotonic() < deadline, "training never reached the step"
        time.sleep(0.05)


def test_one_run_per_directory_and_ctrl_c_saves(stdlib_dataset, tmp_path):
    """A second start on a run in use stops at once naming the holder; Ctrl-C saves like
    SIGTERM (exit 130, the lock released); a second Ctrl-C aborts without saving."""
    run_dir = tmp_path / "busy"
    args = _args(run_dir, stdlib_dataset, "train.max_steps=400", "train.checkpoint_every=400")
    first = _start(args)
    _wait_for_steps(run_dir, 2, first)
    config = (run_dir / "config.yaml").read_text()
    [(code, err)] = _finish(_start(args, port=29613))
    assert code == EXIT_BAD_INPUT, err[-3000:]
    assert f"is in use by another training process (host {socket.gethostname()} pid " in err
    assert f"pid {first[0].pid}," in err
    assert (run_dir / "config.yaml").read_text() == config

    first[0].send_signal(signal.SIGINT)
    [(code, err)] = _finish(first)
    assert code == EXIT_INTERRUPTED, err[-3000:]
    assert "Ctrl-C: saving a checkpoint after this step" in err and "Ctrl-C: saved" in err
    saved = int((run_dir / "checkpoints" / "latest").read_text().removeprefix("step_"))
    assert saved >= 2 and not (run_dir / LOCK_FILE).exists()

    again = _start(args)
    _wait_for_steps(run_dir, saved + 2, again)
    again[0].send_signal(signal.SIGINT)
    time.sleep(0.05)
    again[0].send_signal(signal.SIGINT)
    [(code, err)] = _finish(again)
    assert code == EXIT_INTERRUPTED and "second Ctrl-C: aborting without saving" in err


@contextmanager
def _small_filesystem(path: Path, *options: str):
    """A tmpfs mounted at `path` (root only, as CI runs) with mount `options`."""
    path.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(path)], check=True
    )
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def test_unwritable_or_full_disk_is_one_line_naming_the_path(stdlib_dataset, tmp_path):
    run_dir = tmp_path / "writable"  # but not its checkpoints/
    run_dir.mkdir()
    with (
        _small_filesystem(tmp_path / "ro", "ro", "size=1m") as ro,
        _small_filesystem(run_dir / "checkpoints", "ro", "size=1m") as checkpoints,
    ):
        unwritable_run, unwritable_checkpoints = (
            _start(_args(ro / "run", stdlib_dataset)),
            _start(_args(run_dir, stdlib_dataset)),
        )  # side by side
        [(code, err)] = _finish(unwritable_run)
        assert code == EXIT_BAD_INPUT, err[-3000:]
        assert f"error: cannot write to {ro / 'run'}: Read-only file system" in err
        assert "MiB free" in err and "Traceback" not in err
        [(code, err)] = _finish(unwritable_checkpoints)
        assert code == EXIT_BAD_INPUT, err[-3000:]
        assert f"error: cannot write to {checkpoints}: Read-only file system" in err
        assert not (run_dir / LOCK_FILE).exists()  # the run directory's lock is released

    # 4 MiB: the run starts, its first checkpoint (about 8 MiB) does not fit.
    with _small_filesystem(tmp_path / "full", "size=4m") as full:
        run_dir = full / "run"
        [(code, err)] = _finish(_start(_args(run_dir, stdlib_dataset, "train.checkpoint_every=4")))
        assert code == EXIT_FAILED, err[-3000:]
        assert f"error: cannot save checkpoint {run_dir / 'checkpoints' / 'step_4'}" in err
        assert "rank 0: " in err and "; 0 MiB free)" in err
        assert "Traceback" not in err
        assert not (run_dir / "checkpoints" / "step_4").exists()  # the partial save removed
        assert [r["step"] for r in _records(run_dir)] == [1, 2, 3, 4]
