"""The run directory's lock (training.rundir) and the private node-local directory (data.cache)
against what a shared node throws at them: a second start inside the same SLURM job, lock
files that are not locks (malformed, links, FIFOs), and paths other users planted."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from tiny_runs import tiny_run_args

from data import cache
from data.cache import cache_root, private_tmp_dir
from training import rundir
from training.rundir import LOCK_FILE, STALE_AFTER_S, RunDirError, RunLock

ROOT = Path(__file__).resolve().parents[2]
EXIT_BAD_INPUT, EXIT_REQUEUE = 2, 75
FOREIGN_UID = 65534


@pytest.fixture(autouse=True)
def _no_slurm(monkeypatch):
    for name in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(name, raising=False)


def _train_cmd(run_dir: Path, dataset: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "launch.train",
        *tiny_run_args(run_dir, dataset, "eval.every_checkpoint=false", *extra),
    ]


def _train_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("SLURM_")
        and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT")
    }
    return {**env, **extra}


def _backdate(path: Path, seconds: float) -> None:
    old = time.time() - seconds
    os.utime(path, (old, old), follow_symlinks=False)


def _write_holder(path: Path, **fields) -> None:
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "job": None, "since": "then"}
    path.write_text(json.dumps({**holder, **fields}))


# --- 1. one SLURM job, two live processes ---------------------------------------------------


def test_a_live_holder_of_the_same_slurm_job_keeps_its_lock(stdlib_dataset, tmp_path):
    """Two launch.train processes of one SLURM job (an srun step, a second launch inside the
    allocation, a requeue racing the old process) on one host: the second stops at once, exit 2,
    naming the first, which goes on training and keeps its metrics."""
    run_dir = tmp_path / "sj"
    env = _train_env(SLURM_JOB_ID="555", OMP_NUM_THREADS="1")
    cmd = _train_cmd(run_dir, stdlib_dataset, "train.max_steps=100000", "train.log_every=1")
    log_file = tmp_path / "first.log"  # a file, not a pipe: its progress bar never blocks it
    with log_file.open("w") as log:
        first = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=log)
    try:
        metrics = run_dir / "metrics.jsonl"
        deadline = time.monotonic() + 300
        while not (metrics.exists() and metrics.read_text().count("\n") >= 1):
            assert first.poll() is None, log_file.read_text()[-3000:]
            assert time.monotonic() < deadline, "the first run never logged a step"
            time.sleep(0.2)
        second = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        try:
            _, err = second.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            second.kill()
            second.communicate()
            pytest.fail("the second process of the job took the lock and trained")
        holder = f"host {socket.gethostname()} pid {first.pid}, SLURM job 555"
        assert second.returncode == EXIT_BAD_INPUT, err[-3000:]
        [line] = [line for line in err.splitlines() if line.startswith("error:")]
        assert "is in use by another training process" in line and holder in line, err[-3000:]
        assert "taking over" not in err
        assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == first.pid
        assert first.poll() is None  # still training
        logged = metrics.read_text().count("\n")
        deadline = time.monotonic() + 120
        while metrics.read_text().count("\n") <= logged:  # it goes on
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=300) == EXIT_REQUEUE, log_file.read_text()[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps[0] == 1 and steps == sorted(steps) and len(steps) > logged  # one run's records
    assert not (run_dir / LOCK_FILE).exists()


def test_the_same_job_on_this_host_is_never_stale_while_its_process_lives(tmp_path, monkeypatch):
    """In-process: a lock of this very job held by a live process of this host holds, however
    long since its heartbeat (a stopped process does not beat); a reused pid does not."""
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    run = tmp_path / "run"
    run.mkdir()
    lock_file = run / LOCK_FILE
    for with_start in (False, True):  # a lock of an earlier version has no start time
        started = {"started": rundir.process_start(os.getpid())} if with_start else {}
        _write_holder(lock_file, job="42", **started)
        _backdate(lock_file, STALE_AFTER_S + 60)
        with pytest.raises(RunDirError, match=rf"pid {os.getpid()}, SLURM job 42"):
            RunLock.acquire(run)
        assert lock_file.exists()
    _write_holder(lock_file, job="42", started=rundir.process_start(os.getpid()) + 1)
    RunLock.acquire(run).release()  # that pid is another process now: stale


def test_the_same_job_on_another_host_is_waited_on_then_taken_over(tmp_path, monkeypatch, caplog):
    """An attempt of this job on another host (a requeue after a hard kill): a fresh lock is
    watched for SAME_JOB_STALE_S; one touched meanwhile is its live holder's (refused), one
    that stays untouched is taken over."""
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setattr(rundir, "SAME_JOB_STALE_S", 1.0, raising=False)
    monkeypatch.setattr(rundir, "POLL_S", 0.1, raising=False)
    run = tmp_path / "run"
    run.mkdir()
    lock_file = run / LOCK_FILE
    elsewhere = {"host": "other-node", "pid": 1, "job": "42"}

    _write_holder(lock_file, **elsewhere)
    _backdate(lock_file, 0.5)
    beats = threading.Timer(0.3, lambda: os.utime(lock_file))
    beats.start()
    start = time.monotonic()
    with pytest.raises(RunDirError, match="host other-node pid 1, SLURM job 42"):
        RunLock.acquire(run)
    beats.join()
    assert time.monotonic() - start < 1.0

    _write_holder(lock_file, **elsewhere)
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="rotalibi"):
        RunLock.acquire(run).release()
    assert 0.9 < time.monotonic() - start < 5
    assert "waiting up to" in caplog.text and "an earlier attempt of this SLURM job" in caplog.text
    assert sorted(p.name for p in run.iterdir()) == []

    _write_holder(lock_file, **{**elsewhere, "job": "41"})  # another job: only the long rule
    _backdate(lock_file, 5)
    with pytest.raises(RunDirError, match="SLURM job 41"):
        RunLock.acquire(run)


# --- 13. lock files that are not locks ------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "why"),
    [
        ('{"host": "h", "pid": "abc"}', "its pid 'abc' is not a positive integer"),
        ("[1, 2]", "it holds a JSON list, not an object"),
        ('{"host": "h", "pid": -1}', "its pid -1 is not a positive integer"),  # kill(-1, 0)
        ('{"pid": 7}', "its host None is not a host name"),
        ("{not json", "it is not JSON"),
        ("", "it is empty"),
    ],
)
def test_a_malformed_lock_counts_by_its_age(tmp_path, caplog, content, why):
    """A regular lock file that is not one of ours: refused naming why while fresh, taken over
    naming why once untouched for STALE_AFTER_S."""
    run = tmp_path / "run"
    run.mkdir()
    lock_file = run / LOCK_FILE
    lock_file.write_text(content)
    with pytest.raises(RunDirError, match="not a lock file of ours") as refused:
        RunLock.acquire(run)
    assert why in str(refused.value)
    _backdate(lock_file, STALE_AFTER_S + 5)
    with caplog.at_level(logging.WARNING, logger="rotalibi"):
        lock = RunLock.acquire(run)
    assert why in caplog.text and "taking over" in caplog.text
    lock.release()
    assert sorted(p.name for p in run.iterdir()) == []


def _plant(run: Path, kind: str) -> None:
    lock_file = run / LOCK_FILE
    if kind == "dangling link":
        lock_file.symlink_to(run / "nowhere")
    elif kind == "link to a FIFO":
        os.mkfifo(run / "fifo")
        lock_file.symlink_to(run / "fifo")
    elif kind == "FIFO":
        os.mkfifo(lock_file)
    elif kind == "link to a lock":
        _write_holder(run / "elsewhere.json", pid=1)
        lock_file.symlink_to(run / "elsewhere.json")
    elif kind == "directory":
        lock_file.mkdir()


NOT_REGULAR = {
    "dangling link": "a symbolic link",
    "link to a FIFO": "a symbolic link",
    "FIFO": "a FIFO",
    "link to a lock": "a symbolic link",
    "directory": "a directory",
}
TRY_EACH = """
import json, sys
from pathlib import Path
from training.rundir import RunLock, RunDirError
for run in sys.argv[1:]:
    print(run, flush=True)  # which one hangs, if one does
    try:
        RunLock.acquire(Path(run))
        print(json.dumps([run, "locked"]), flush=True)
    except RunDirError as e:
        print(json.dumps([run, str(e)]), flush=True)
"""


def test_a_lock_that_is_not_a_regular_file_is_a_clear_error_not_a_hang(tmp_path):
    """A real process tries to lock run directories whose lock is a link, a FIFO, a
    directory: each stops at once naming what the lock is (never opening it: a FIFO would block
    it for good, deaf to SIGTERM) and leaves it for a person to look at."""
    runs = {kind: tmp_path / kind.replace(" ", "-") for kind in NOT_REGULAR}
    for kind, run in runs.items():
        run.mkdir()
        _plant(run, kind)
    try:
        done = subprocess.run(
            [sys.executable, "-c", TRY_EACH, *map(str, runs.values())],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else e.stdout or ""
        pytest.fail(f"locking a run directory hangs on {out.splitlines()[-1:]}")
    assert done.returncode == 0, done.stderr[-3000:]
    outcomes = dict(json.loads(line) for line in done.stdout.splitlines() if line[0] == "[")
    for kind, run in runs.items():
        message = outcomes[str(run)]
        assert f"the lock {run / LOCK_FILE} is {NOT_REGULAR[kind]}" in message, (kind, message)
        assert "remove it" in message
        assert os.path.lexists(run / LOCK_FILE)


def test_release_and_heartbeat_never_open_a_lock_replaced_by_a_fifo(tmp_path, monkeypatch):
    """A held lock replaced by a FIFO: releasing it returns (leaving the FIFO), in a real
    process with a timeout."""
    run = tmp_path / "run"
    code = (
        "import os, sys; from pathlib import Path; from training.rundir import RunLock\n"
        "run = Path(sys.argv[1]); lock = RunLock.acquire(run)\n"
        "os.unlink(run / '.lock'); os.mkfifo(run / '.lock')\n"
        "assert not lock._holds(); lock.release(); print('released')\n"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", code, str(run)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("releasing a lock replaced by a FIFO hangs")
    assert done.returncode == 0 and done.stdout.strip() == "released", done.stderr[-3000:]
    assert stat.S_ISFIFO(os.lstat(run / LOCK_FILE).st_mode)


def test_a_lock_taken_over_in_between_is_put_back(tmp_path, monkeypatch):
    """Two processes judge one lock stale; the first takes it over and holds it; the second,
    late, must not remove the first's fresh lock."""
    run = tmp_path / "run"
    run.mkdir()
    lock_file = run / LOCK_FILE
    _write_holder(lock_file, host="other-node", pid=1)
    _backdate(lock_file, STALE_AFTER_S + 5)
    stale = rundir._read_lock(lock_file)
    winner = RunLock.acquire(run)  # takes the stale lock over
    RunLock._remove(lock_file, stale, run / ".lock.stale-late")  # the late one, on old news
    assert winner._holds()
    with pytest.raises(RunDirError, match=f"pid {os.getpid()}"):
        RunLock.acquire(run)
    winner.release()
    assert sorted(p.name for p in run.iterdir()) == []


# --- 2 and 14. the private directory under planted paths ------------------------------------


def _rotalibi_entries(tmp: Path) -> list[str]:
    return sorted(p.name for p in tmp.iterdir() if p.name.startswith("rotalibi-"))


def _foreign_dir(path: Path) -> None:
    path.mkdir(mode=0o700)
    os.chown(path, FOREIGN_UID, FOREIGN_UID)


@pytest.mark.parametrize(
    ("plant", "problem"),
    [
        (lambda p: p.write_text(""), "not a directory"),
        (_foreign_dir, f"belongs to uid {FOREIGN_UID}"),
        (lambda p: p.symlink_to(p.parent), "not a directory"),
        (lambda p: p.symlink_to(p.parent / "nowhere"), "not a directory"),
    ],
)
def test_a_planted_private_dir_gives_one_deterministic_private_fallback(
    tmp_path, monkeypatch, caplog, plant, problem
):
    """<tmp>/rotalibi-<uid> planted by someone else (a file, their directory, a link): every
    call uses the same private <tmp>/rotalibi-<uid>-1 (0700, ours, a real directory), so the
    set-up lock stays shared between jobs and the cache is reused; no directory more per run."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    uid = os.getuid()
    plant(tmp_path / f"rotalibi-{uid}")
    with caplog.at_level(logging.WARNING):
        first = private_tmp_dir()
    assert first == tmp_path / f"rotalibi-{uid}-1"
    assert problem in caplog.text and str(first) in caplog.text
    info = os.lstat(first)
    assert stat.S_ISDIR(info.st_mode) and info.st_uid == uid
    assert stat.S_IMODE(info.st_mode) == 0o700
    entries = _rotalibi_entries(tmp_path)
    assert private_tmp_dir() == first and cache_root(None) == first / "streaming"
    with cache.streaming_setup_lock():
        pass
    assert _rotalibi_entries(tmp_path) == entries  # nothing new
    assert (first / "streaming-setup.lock").exists()


def test_the_fallback_skips_planted_fallbacks_too(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    uid = os.getuid()
    _foreign_dir(tmp_path / f"rotalibi-{uid}")
    _foreign_dir(tmp_path / f"rotalibi-{uid}-1")
    (tmp_path / f"rotalibi-{uid}-2").symlink_to(tmp_path)
    opened = tmp_path / f"rotalibi-{uid}-3"
    opened.mkdir(mode=0o700)
    opened.chmod(0o777)  # ours but opened to others: not trusted
    assert private_tmp_dir() == tmp_path / f"rotalibi-{uid}-4"
    assert private_tmp_dir() == tmp_path / f"rotalibi-{uid}-4"
    assert len(_rotalibi_entries(tmp_path)) == 5


def test_a_planted_file_does_not_stop_training(stdlib_dataset, tmp_path):
    """launch.train with $TMPDIR/rotalibi-<uid> planted as a plain file: it trains, warning,
    in the private fallback directory."""
    tmp = tmp_path / "t"
    tmp.mkdir()
    uid = os.getuid()
    (tmp / f"rotalibi-{uid}").write_text("")
    done = subprocess.run(
        _train_cmd(tmp_path / "p", stdlib_dataset, "train.max_steps=2"),
        cwd=ROOT,
        env=_train_env(TMPDIR=str(tmp)),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"not using {tmp / f'rotalibi-{uid}'}: it is not a directory" in done.stderr
    assert _rotalibi_entries(tmp) == [f"rotalibi-{uid}", f"rotalibi-{uid}-1"]
    assert (tmp / f"rotalibi-{uid}-1" / "streaming").is_dir()
