"""launch.slurm against a real SLURM: tests/helpers/slurm_cluster.sh brings up a one-node cluster
(root,
Debian packages installed when missing); the tiny config trains as 2 CPU ranks of ZeRO-3 over
gloo, a run signalled mid-way is requeued and resumes to the losses of one that was not, and a
job array trains each of its configs in its own run directory, requeueing only the task it
signals."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_SCRIPT = ROOT / "tests" / "helpers" / "slurm_cluster.sh"
TINY = ROOT / "configs" / "tiny.yaml"
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"}
MAX_STEPS, BATCH, SEQ_LEN, RANKS = 30, 4, 64, 2

# The job log of a run signalled once: it saved, exited, was requeued and finished.
REQUEUED_ONCE = [
    (0, "start"),
    (0, "signal"),
    (0, "exit"),
    (0, "requeue"),
    (1, "start"),
    (1, "exit"),
]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A running one-node cluster; SLURM_CONF points the client commands (and jobs) at it."""
    directory = tmp_path_factory.mktemp("slurm")
    up = subprocess.run(
        [str(CLUSTER_SCRIPT), "up", str(directory)], capture_output=True, text=True, timeout=900
    )
    if up.returncode != 0:
        pytest.fail(f"the test SLURM cluster did not come up:\n{up.stdout}\n{up.stderr}")
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(directory / "slurm.conf")
    yield directory
    subprocess.run([str(CLUSTER_SCRIPT), "down", str(directory)], check=False, timeout=120)
    if previous is None:
        del os.environ["SLURM_CONF"]
    else:
        os.environ["SLURM_CONF"] = previous


def launch_slurm(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    """`python -m launch.slurm ...` run from `workdir`, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "launch.slurm", *args],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=120,
    )


def training_args(workdir: Path, name: str, dataset: Path) -> list[str]:
    return [
        str(TINY),
        f"run.dir={workdir / 'runs'}",
        f"run.name={name}",
        f"data.path={dataset}",
        f"data.batch_size={BATCH}",
        f"data.seq_len={SEQ_LEN}",
        f"train.max_steps={MAX_STEPS}",
        "train.checkpoint_every=10",
        "train.log_every=1",
        "train.warmup_steps=3",
        "eval.every_checkpoint=false",
        "slurm.gpus_per_node=0",
        f"slurm.tasks_per_node={RANKS}",
        "slurm.cpus_per_task=1",
        "slurm.time=20:00",
        "slurm.signal_lead_s=60",
    ]


def submit(workdir: Path, name: str, dataset: Path) -> tuple[str, Path]:
    """Submit the tiny config as 2 CPU tasks; (job id, run directory)."""
    done = launch_slurm(workdir, *training_args(workdir, name, dataset))
    assert done.returncode == 0, done.stderr
    job, run_dir = re.search(
        r"submitted training job (\d+); run directory (\S+)", done.stdout
    ).groups()
    return job, Path(run_dir)


def job_field(job: str, name: str) -> str:
    """A field of `scontrol show job` (JobState, Restarts, ...)."""
    out = subprocess.run(
        ["scontrol", "-o", "show", "job", job], capture_output=True, text=True, check=True
    ).stdout
    return re.search(rf"\b{name}=(\S+)", out).group(1)


def logs(run_dir: Path) -> str:
    """The tails of the run's batch and rank logs, for failure messages."""
    files = sorted((run_dir / "logs").glob("*")) if (run_dir / "logs").is_dir() else []
    return "\n".join(f"== {p}\n{p.read_text()[-3000:]}" for p in files)


def wait_for(condition, what: str, run_dir: Path, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}\n{logs(run_dir)}")
        time.sleep(0.1)


def wait_until_ended(job: str, run_dir: Path) -> str:
    wait_for(lambda: job_field(job, "JobState") in ENDED, f"job {job} to end", run_dir)
    return job_field(job, "JobState")


def losses(run_dir: Path) -> dict[int, float]:
    path = run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "slurm" / "events.jsonl").open()]


def test_unknown_partition_is_named_before_submitting(cluster, tmp_path):
    done = launch_slurm(tmp_path, str(TINY), "slurm.gpus_per_node=0", "slurm.partition=debug,gpus")
    assert done.returncode == 2
    assert "partition 'gpus' (slurm.partition) does not exist" in done.stderr
    assert "partitions: debug" in done.stderr
    assert not (tmp_path / "runs").exists()


def test_missing_dataset_is_named_before_submitting(cluster, tmp_path):
    done = launch_slurm(tmp_path, str(TINY), "slurm.gpus_per_node=0", "data.path=nowhere")
    assert done.returncode == 2
    assert "nowhere is not a dataset" in done.stderr and "make data" in done.stderr
    assert not (tmp_path / "runs").exists()


@pytest.fixture(scope="module")
def uninterrupted(cluster, stdlib_dataset, tmp_path_factory) -> tuple[str, Path, str]:
    """A 2-rank training job that ran to the end: (job id, run directory, final state)."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    job, run_dir = submit(workdir, "whole", stdlib_dataset)
    return job, run_dir, wait_until_ended(job, run_dir)


def test_two_ranks_train_the_tiny_config(uninterrupted):
    job, run_dir, state = uninterrupted
    assert state == "COMPLETED", logs(run_dir)
    assert job_field(job, "Restarts") == "0"
    assert [(e["attempt"], e["event"], e.get("code")) for e in events(run_dir)] == [
        (0, "start", None),
        (0, "exit", 0),
    ]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    trained = [r for r in records if "loss" in r]
    assert [r["step"] for r in trained] == list(range(1, MAX_STEPS + 1))
    assert trained[-1]["tokens"] == MAX_STEPS * RANKS * BATCH * SEQ_LEN
    assert trained[-1]["loss"] < trained[0]["loss"] - 1.0  # it learns
    # Both ranks trained: each saved its ZeRO-3 partition and loader state in every checkpoint.
    saved = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert saved == ["step_10", "step_20", "step_30"]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{MAX_STEPS}"
    for step in saved:
        directory = run_dir / "checkpoints" / step
        assert json.loads((directory / "rotalibi.json").read_text())["world_size"] == RANKS
        names = {p.name for p in directory.iterdir()}
        assert {f"trainer_rank_{r}.pt" for r in range(RANKS)} <= names
        assert sum(n.endswith("optim_states.pt") for n in names) == RANKS
    assert (run_dir / "config.yaml").is_file()
    # Per-rank logs and the batch log live in the run directory.
    assert {p.name for p in (run_dir / "logs").iterdir()} == {
        "rank-0.log",
        "rank-1.log",
        f"slurm-{job}.out",
    }


def test_run_directory_of_another_model_is_refused(uninterrupted, stdlib_dataset):
    _, run_dir, _ = uninterrupted
    workdir = run_dir.parent.parent
    args = [*training_args(workdir, run_dir.name, stdlib_dataset), "model.d_model=64"]
    done = launch_slurm(workdir, *args)
    assert done.returncode == 2
    assert "holds checkpoints of a different model" in done.stderr
    assert "model.d_model: 128 -> 64" in done.stderr
    assert len((run_dir / "slurm" / "jobs.jsonl").read_text().splitlines()) == 1


def test_preempted_run_is_requeued_and_resumes_exactly(uninterrupted, stdlib_dataset, tmp_path):
    _, whole, _ = uninterrupted
    job, run_dir = submit(tmp_path, "preempted", stdlib_dataset)
    wait_for(lambda: len(losses(run_dir)) >= 4, "the first steps", run_dir)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True)
    # While the job lives (saving, requeued, resumed), a second one for the run is refused.
    again = launch_slurm(tmp_path, *training_args(tmp_path, "preempted", stdlib_dataset))
    assert again.returncode == 2 and f"job {job} is already training" in again.stderr

    state = wait_until_ended(job, run_dir)
    assert state == "COMPLETED", logs(run_dir)
    assert job_field(job, "Restarts") == "1"  # requeued once, same job id

    seen = events(run_dir)
    assert [(e["attempt"], e["event"]) for e in seen] == REQUEUED_ONCE
    saved = seen[2]["checkpoint"]  # the checkpoint written on the signal
    assert seen[2]["code"] == 75 and 4 <= int(saved.removeprefix("step_")) < MAX_STEPS
    assert seen[4]["checkpoint"] == saved  # the second attempt starts from it
    assert seen[5]["code"] == 0 and seen[5]["checkpoint"] == f"step_{MAX_STEPS}"
    assert (
        f"resumed from {run_dir / 'checkpoints' / saved}"
        in (run_dir / "logs" / "rank-0.log").read_text()
    )

    # One continuous run: every step logged once, with the uninterrupted run's losses.
    resumed, reference = losses(run_dir), losses(whole)
    assert list(resumed) == list(range(1, MAX_STEPS + 1))
    assert resumed == reference

    report = launch_slurm(tmp_path, "--status", str(run_dir))
    assert report.returncode == 0, report.stderr
    lines = report.stdout.splitlines()
    assert (
        lines[0]
        == f"run {run_dir}: last logged step {MAX_STEPS}, latest checkpoint step_{MAX_STEPS}"
    )
    assert lines[1].split()[:4] == ["job", job, "train", "COMPLETED"]
    assert lines[2] == f"  attempt 0: from none, signalled (USR1), exit 75 at {saved}, requeued"
    assert lines[3] == f"  attempt 1: from {saved}, exit 0 at step_{MAX_STEPS}, finished"


ARRAY_STEPS = 6


def test_job_array_trains_each_config_in_its_own_run(cluster, stdlib_dataset, tmp_path):
    """Two configs (the tiny one with rope, with alibi) as one job array of 1-CPU tasks that
    start together on one node; the task that holds the array's own job id is signalled
    mid-way and requeued alone."""
    schemes = ["rope", "alibi"]
    configs = []
    for scheme in schemes:
        config = tmp_path / f"{scheme}.yaml"
        config.write_text(f"base: {TINY}\nrun:\n  name: {scheme}\nmodel:\n  scheme: {scheme}\n")
        configs.append(config)
    run_dirs = [tmp_path / "runs" / scheme for scheme in schemes]
    overrides = [
        f"run.dir={tmp_path / 'runs'}",
        f"data.path={stdlib_dataset}",
        "data.batch_size=4",
        f"train.max_steps={ARRAY_STEPS}",
        f"train.checkpoint_every={ARRAY_STEPS // 2}",
        "train.log_every=1",
        "train.warmup_steps=1",
        "eval.every_checkpoint=false",
        "slurm.gpus_per_node=0",
        "slurm.tasks_per_node=1",
        "slurm.cpus_per_task=1",
        "slurm.time=20:00",
        "slurm.signal_lead_s=60",
    ]
    done = launch_slurm(tmp_path, "--array", *map(str, configs), *overrides)
    assert done.returncode == 0, done.stderr
    array = re.search(r"submitted training job array (\d+) of 2 tasks", done.stdout).group(1)
    tasks = [f"{array}_{task}" for task in range(len(schemes))]
    # While the array lives, a job of its own for one of its runs is refused.
    again = launch_slurm(tmp_path, str(configs[1]), *overrides)
    assert again.returncode == 2 and f"job {tasks[1]} is already training" in again.stderr

    # Signal the task that holds the array's job id (its SLURM_JOB_ID): requeueing that id
    # would requeue every task of the array, so it must requeue by "<array>_<task>".
    for task, run_dir in zip(tasks, run_dirs, strict=True):
        wait_for(lambda t=task: job_field(t, "JobState") != "PENDING", f"{task} to start", run_dir)
    held = next(i for i, task in enumerate(tasks) if job_field(task, "JobId") == array)
    signalled, other = run_dirs[held], run_dirs[1 - held]

    def stepped_or_ended() -> bool:
        return bool(losses(signalled)) or job_field(tasks[held], "JobState") in ENDED

    wait_for(stepped_or_ended, "the first step", signalled)
    assert losses(signalled), logs(signalled)
    subprocess.run(["scancel", "--batch", "--signal=USR1", tasks[held]], check=True)
    for task, run_dir in zip(tasks, run_dirs, strict=True):
        assert wait_until_ended(task, run_dir) == "COMPLETED", logs(run_dir)
    assert job_field(tasks[held], "Restarts") == "1"
    assert job_field(tasks[1 - held], "Restarts") == "0"

    seen = events(signalled)
    assert [(e["attempt"], e["event"]) for e in seen] == REQUEUED_ONCE
    saved = seen[2]["checkpoint"]
    assert seen[2]["code"] == 75 and seen[4]["checkpoint"] == saved
    assert [(e["attempt"], e["event"], e.get("code")) for e in events(other)] == [
        (0, "start", None),
        (0, "exit", 0),
    ]
    for task, scheme, run_dir in zip(tasks, schemes, run_dirs, strict=True):
        # Each run: its own config, every step once, its checkpoints, its rank log; the
        # events, records and status under the task's id.
        assert all(e["job"] == task for e in events(run_dir))
        assert f"scheme: {scheme}\n" in (run_dir / "config.yaml").read_text()
        assert list(losses(run_dir)) == list(range(1, ARRAY_STEPS + 1))
        latest = (run_dir / "checkpoints" / "latest").read_text().strip()
        assert latest == f"step_{ARRAY_STEPS}"
        assert (run_dir / "checkpoints" / f"step_{ARRAY_STEPS // 2}" / "rotalibi.json").is_file()
        assert {p.name for p in (run_dir / "logs").iterdir()} == {"rank-0.log"}
        batch_log = tmp_path / "runs" / "logs" / f"array-{task}.out"
        assert f"rotalibi: job {task} attempt 0 on" in batch_log.read_text()
        report = launch_slurm(tmp_path, "--status", str(run_dir))
        assert report.returncode == 0, report.stderr
        lines = report.stdout.splitlines()
        assert (
            lines[0] == f"run {run_dir}: last logged step {ARRAY_STEPS}, latest checkpoint {latest}"
        )
        assert lines[1].split()[:4] == ["job", task, "train", "COMPLETED"]
        if run_dir == signalled:
            assert lines[2:] == [
                f"  attempt 0: from none, signalled (USR1), exit 75 at {saved}, requeued",
                f"  attempt 1: from {saved}, exit 0 at {latest}, finished",
            ]
        else:
            assert lines[2:] == [f"  attempt 0: from none, exit 0 at {latest}, finished"]
