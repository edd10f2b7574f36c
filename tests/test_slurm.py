"""launch.slurm without a cluster: the rendered job scripts, their signal and requeue logic (run
under stand-ins for srun and scontrol), the status report, and the errors for bad input."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from launch.config import load_config, to_yaml
from launch.slurm import SlurmError, main, status, time_limit_seconds

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"

CLUSTER_4X8 = {
    "run": {"name": "big", "dir": "runs"},
    "slurm": {
        "nodes": 4,
        "gpus_per_node": 8,
        "cpus_per_task": 12,
        "mem": "480G",
        "time": "1-12:00:00",
        "partition": "gpu",
        "account": "lm",
        "qos": "high",
        "constraint": "h100",
        "job_name": "rotalibi-big",
        "signal_lead_s": 600,
        "extra_sbatch": ["--exclusive", "#SBATCH --mail-type=END"],
        "setup": ["module load cuda/12.4", "source /opt/venv/bin/activate"],
        "env": {"NCCL_IB_HCA": "mlx5", "NCCL_SOCKET_IFNAME": "^lo,docker0"},
    },
}


def write_config(path: Path, sections: dict) -> Path:
    """The tiny config with `sections` merged over it, as a YAML file."""
    config = yaml.safe_load(TINY.read_text())
    for key, value in sections.items():
        config[key] = {**config.get(key, {}), **value}
    path.write_text(yaml.safe_dump(config))
    return path


def render(args: list[str], cwd: Path, capsys, monkeypatch) -> str:
    monkeypatch.chdir(cwd)
    assert main([*args, "--dry-run"]) == 0
    return capsys.readouterr().out


def sbatch_options(script: str) -> list[str]:
    return [line.removeprefix("#SBATCH ") for line in script.splitlines() if "#SBATCH" in line]


def test_dry_run_4_nodes_x_8_gpus(tmp_path, capsys, monkeypatch):
    config = write_config(tmp_path / "big.yaml", CLUSTER_4X8)
    script = render([str(config), "train.max_steps=7"], tmp_path, capsys, monkeypatch)
    run_dir = tmp_path / "runs" / "big"
    assert sbatch_options(script) == [
        "--job-name=rotalibi-big",
        "--nodes=4",
        "--ntasks-per-node=8",
        "--gpus-per-node=8",
        "--cpus-per-task=12",
        "--mem=480G",
        "--time=1-12:00:00",
        "--partition=gpu",
        "--account=lm",
        "--qos=high",
        "--constraint=h100",
        f"--chdir={tmp_path}",
        f"--output={run_dir}/logs/slurm-%j.out",
        "--open-mode=append",
        "--requeue",
        "--signal=B:USR1@600",
        "--exclusive",
        "--mail-type=END",
    ]
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    # Setup lines and network knobs come after the signal traps and before training starts.
    traps = lines.index("trap 'forward_signal USR1' USR1")
    start = lines.index('    "${TRAIN[@]}" &')
    for expected in (
        "module load cuda/12.4",
        "source /opt/venv/bin/activate",
        "export NCCL_IB_HCA=mlx5",
        "export NCCL_SOCKET_IFNAME='^lo,docker0'",
    ):
        assert traps < lines.index(expected) < start
    first_srun = next(i for i, line in enumerate(lines) if line.startswith("TRAIN=("))
    # One task per GPU, rank logs under the run directory, the resolved config snapshot.
    words = shlex.split(lines[first_srun].removeprefix("TRAIN=(").removesuffix(")"))
    assert words[:5] == [
        "srun",
        "--ntasks-per-node=8",
        "--cpus-per-task=12",
        f"--output={run_dir}/logs/rank-%t.log",
        "--open-mode=append",
    ]
    assert words[5:8] == [sys.executable, "-m", "launch.train"]
    snapshot = Path(words[8])
    assert snapshot.parent == run_dir / "slurm" and snapshot.suffix == ".yaml"
    assert not snapshot.exists()  # a dry run writes nothing
    assert not run_dir.exists()
    # The signal is trapped and forwarded, training runs in the background so the trap can
    # fire, and only the requeue exit code requeues.
    assert "trap 'forward_signal TERM' TERM" in script
    assert 'kill -USR1 "$train_pid"' in script
    assert "EXIT_REQUEUE=75" in script and 'scontrol requeue "$SLURM_JOB_ID"' in script
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)


def test_cpu_tasks_and_defaults(tmp_path, capsys, monkeypatch):
    slurm = {"gpus_per_node": 0, "tasks_per_node": 2, "cpus_per_task": 1, "time": "30"}
    config = write_config(tmp_path / "cpu.yaml", {"slurm": slurm})
    options = sbatch_options(render([str(config)], tmp_path, capsys, monkeypatch))
    assert "--ntasks-per-node=2" in options and "--job-name=tiny" in options
    assert not any(o.startswith(("--gpus", "--partition", "--account", "--mem")) for o in options)
    assert "--signal=B:USR1@300" in options
    # gpus_per_node=0 without tasks_per_node: one task.
    config = write_config(tmp_path / "one.yaml", {"slurm": {"gpus_per_node": 0}})
    assert "--ntasks-per-node=1" in sbatch_options(
        render([str(config)], tmp_path, capsys, monkeypatch)
    )


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 90 * 60),
        ("5:30", 5 * 60 + 30),
        ("12:00:00", 12 * 3600),
        ("2-0", 2 * 86400),
        ("1-2:3", 86400 + 2 * 3600 + 3 * 60),
        ("1-12:00:05", 86400 + 12 * 3600 + 5),
        ("UNLIMITED", None),
    ],
)
def test_time_limit_formats(text, seconds):
    assert time_limit_seconds(text) == seconds


@pytest.mark.parametrize(
    ("override", "fragments"),
    [
        ("slurm.time=1:2:3:4", ["'slurm.time'", "'1:2:3:4'", "HH:MM:SS"]),
        ("slurm.signal_lead_s=600", ["'slurm.signal_lead_s' is 600", "'10:00' (600 s)"]),
        ("slurm.tasks_per_node=4", ["'slurm.tasks_per_node' is 4", "one task per GPU"]),
        ("slurm.env={BAD-NAME: 1}", ["'BAD-NAME'", "environment variable"]),
        ("slurm.extra_sbatch=[exclusive]", ["'exclusive'", "not an sbatch option"]),
        ("slurm.eval_time=soon", ["'slurm.eval_time'", "'soon'"]),
    ],
)
def test_bad_slurm_values_are_named(override, fragments, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main([str(TINY), "slurm.time=10:00", override, "--dry-run"]) == 2
    err = capsys.readouterr().err
    for fragment in fragments:
        assert fragment in err


def test_time_limits_are_taken_as_written(tmp_path, capsys, monkeypatch):
    # YAML 1.1 would read these as the sexagesimal integers 43200 and 600 (minutes to SLURM).
    config = tmp_path / "unquoted.yaml"
    config.write_text(TINY.read_text() + "slurm:\n  time: 12:00:00\n  eval_time: 10:00\n")
    assert "--time=12:00:00" in sbatch_options(render([str(config)], tmp_path, capsys, monkeypatch))
    script = render([str(config), "slurm.time=1:30:00"], tmp_path, capsys, monkeypatch)
    assert "--time=1:30:00" in sbatch_options(script)


def test_config_without_slurm_section(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main([str(TINY)]) == 2
    err = capsys.readouterr().err
    assert f"{TINY} has no 'slurm' section" in err and "slurm.partition=" in err
    assert not (tmp_path / "runs").exists()
    # Overrides of the slurm section count as one.
    assert main([str(TINY), "slurm.gpus_per_node=0", "--dry-run"]) == 0


def test_no_slurm_on_this_machine(tmp_path, capsys, monkeypatch):
    config = write_config(tmp_path / "cpu.yaml", {"slurm": {"gpus_per_node": 0}})
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert main([str(config)]) == 2
    err = capsys.readouterr().err
    assert "'sbatch' is not on PATH" in err and "--dry-run" in err
    assert not (tmp_path / "runs").exists()  # nothing half-written


def test_unknown_config_key_fails_before_slurm(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main([str(TINY), "slurm.gpu_per_node=0"]) == 2
    assert "did you mean 'slurm.gpus_per_node'" in capsys.readouterr().err


def make_run_dir(root: Path, overrides: list[str] = ()) -> Path:
    """A run directory as launch.train leaves it: config.yaml and a checkpoint."""
    cfg = load_config(TINY, ["run.dir=" + str(root / "runs"), *overrides])
    run_dir = cfg.run_dir
    (run_dir / "checkpoints" / "step_40").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    return run_dir


def test_eval_job_rendering(tmp_path, capsys, monkeypatch):
    run_dir = make_run_dir(tmp_path, ["slurm.gpus_per_node=8", "slurm.nodes=16"])
    checkpoint = run_dir / "checkpoints" / "step_40"
    args = ["--eval", str(checkpoint), "eval.lengths=[1024,8192]", "slurm.eval_time=2:00:00"]
    script = render(args, tmp_path, capsys, monkeypatch)
    options = sbatch_options(script)
    # One task with one GPU on one node, whatever the training job used.
    for expected in ("--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=1", "--time=2:00:00"):
        assert expected in options
    assert f"--output={run_dir}/logs/eval-%j.out" in options
    assert "--job-name=tiny-eval" in options
    assert not any(o.startswith("--signal") for o in options)
    srun = shlex.split(next(line for line in script.splitlines() if line.startswith("srun")))
    assert srun[:2] == ["srun", "--ntasks=1"]
    assert srun[3:] == [
        sys.executable,
        "-m",
        "launch.evaluate",
        str(checkpoint),
        "eval.lengths=[1024,8192]",  # slurm.* overrides stay with the job, not the evaluation
    ]
    # The run directory works as a target too, and options after `--` go to launch.evaluate.
    assert main(["--eval", str(run_dir), "--dry-run", "--", "--all"]) == 0
    assert f"launch.evaluate {run_dir} --all\n" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # not for training jobs
        main([str(TINY), "slurm.gpus_per_node=0", "--dry-run", "--", "--all"])
    assert "they need --eval" in capsys.readouterr().err
    # A path that is neither a run nor a checkpoint, or a wrong key, fails before submitting.
    assert main(["--eval", str(tmp_path), "--dry-run"]) == 2
    assert "neither a run directory nor a checkpoint" in capsys.readouterr().err
    assert main(["--eval", str(run_dir), "eval.lenghts=[5]", "--dry-run"]) == 2
    assert "unknown config key 'eval.lenghts'" in capsys.readouterr().err


# ---------------------------------------------------------------- the job logic, run for real

FAKE_SRUN = """#!/bin/bash
# srun stand-in: behaves like training; USR1 makes it "checkpoint" and exit $FAKE_ON_SIGNAL.
echo "$@" > "$FAKE/srun.args"
trap 'echo step_3 > "$RUN/checkpoints/latest"; exit "$FAKE_ON_SIGNAL"' USR1
mkdir -p "$RUN/checkpoints"
touch "$FAKE/srun.started"
for _ in $(seq 20); do sleep 0.05; done
echo step_9 > "$RUN/checkpoints/latest"
exit "$FAKE_EXIT"
"""


def run_job_script(
    tmp_path: Path,
    capsys,
    monkeypatch,
    *,
    exit_code: int = 0,
    on_signal: int = 75,
    signal_when: str | None = None,
    signal_name: str = "USR1",
):
    """Run the rendered training script with srun and scontrol replaced by stand-ins, sending
    it `signal_name` once the file `signal_when` (in the stand-ins' directory) exists."""
    fake = tmp_path / "bin"
    setup = {"setup": ['touch "$FAKE/setup.started"; sleep 0.5']}
    config = write_config(tmp_path / "cpu.yaml", {"slurm": {"gpus_per_node": 0, **setup}})
    script = tmp_path / "job.sh"
    script.write_text(render([str(config)], tmp_path, capsys, monkeypatch))
    fake.mkdir()
    (fake / "srun").write_text(FAKE_SRUN)
    (fake / "scontrol").write_text('#!/bin/bash\necho "$@" >> "$FAKE/scontrol.args"\n')
    for tool in fake.iterdir():
        tool.chmod(0o755)
    run_dir = tmp_path / "runs" / "tiny"
    env = {
        **os.environ,
        "PATH": f"{fake}:{os.environ['PATH']}",
        "FAKE": str(fake),
        "RUN": str(run_dir),
        "FAKE_EXIT": str(exit_code),
        "FAKE_ON_SIGNAL": str(on_signal),
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "node[1-2]",
        "SLURM_RESTART_COUNT": "1",
    }
    job = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, text=True)
    if signal_when is not None:
        deadline = time.monotonic() + 30
        while not (fake / signal_when).exists():
            assert time.monotonic() < deadline and job.poll() is None
            time.sleep(0.02)
        job.send_signal(getattr(signal, f"SIG{signal_name}"))
    out, _ = job.communicate(timeout=60)
    scontrol = fake / "scontrol.args"
    events = [json.loads(line) for line in (run_dir / "slurm" / "events.jsonl").open()]
    started = (fake / "srun.args").exists()
    return job.returncode, out, scontrol.read_text() if scontrol.exists() else "", events, started


@pytest.mark.parametrize("signal_name", ["USR1", "TERM"])
def test_job_script_forwards_signal_and_requeues(tmp_path, capsys, monkeypatch, signal_name):
    code, out, scontrol, events, _ = run_job_script(
        tmp_path, capsys, monkeypatch, signal_when="srun.started", signal_name=signal_name
    )
    assert code == 0 and scontrol == "requeue 4242\n"
    assert [e["event"] for e in events] == ["start", "signal", "exit", "requeue"]
    assert all(e["job"] == "4242" and e["attempt"] == 1 for e in events)
    assert events[0]["checkpoint"] == "none" and events[0]["nodes"] == "node[1-2]"
    assert events[1]["signal"] == signal_name
    assert events[2]["code"] == 75 and events[2]["checkpoint"] == "step_3"
    assert "resumes from step_3" in out


def test_signal_during_setup_requeues_without_training(tmp_path, capsys, monkeypatch):
    code, _, scontrol, events, started = run_job_script(
        tmp_path, capsys, monkeypatch, signal_when="setup.started"
    )
    assert not started and code == 0 and scontrol == "requeue 4242\n"
    assert [e["event"] for e in events] == ["signal", "start", "exit", "requeue"]
    assert events[2]["code"] == 75 and events[2]["checkpoint"] == "none"


def test_signalled_run_that_died_otherwise_is_requeued(tmp_path, capsys, monkeypatch):
    # E.g. the signal reached the ranks before they could handle it: they died of it.
    code, _, scontrol, events, _ = run_job_script(
        tmp_path, capsys, monkeypatch, on_signal=138, signal_when="srun.started"
    )
    assert code == 0 and scontrol == "requeue 4242\n"
    assert [e["event"] for e in events] == ["start", "signal", "exit", "requeue"]
    assert events[2]["code"] == 138


@pytest.mark.parametrize("exit_code", [0, 1, 2])
def test_job_script_without_requeue_code_does_not_requeue(tmp_path, capsys, monkeypatch, exit_code):
    code, _, scontrol, events, started = run_job_script(
        tmp_path, capsys, monkeypatch, exit_code=exit_code
    )
    assert started and code == exit_code and scontrol == ""
    assert [e["event"] for e in events] == ["start", "exit"]
    assert events[1]["code"] == exit_code and events[1]["checkpoint"] == "step_9"


def test_finished_run_is_not_requeued_even_if_signalled(tmp_path, capsys, monkeypatch):
    # The signal arrives as training finishes: it exits 0, and the run stays finished.
    code, _, scontrol, events, _ = run_job_script(
        tmp_path, capsys, monkeypatch, on_signal=0, signal_when="srun.started"
    )
    assert code == 0 and scontrol == ""
    assert [e["event"] for e in events] == ["start", "signal", "exit"]


def test_status_reports_jobs_and_attempts(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no squeue: the events tell the story
    run_dir = make_run_dir(tmp_path)
    with pytest.raises(SlurmError, match="no SLURM jobs recorded"):
        status(run_dir)
    slurm_dir = run_dir / "slurm"
    slurm_dir.mkdir()
    jobs = [
        {"job": "7", "kind": "train", "submitted": "t0", "config": "slurm/config-a.yaml"},
        {"job": "9", "kind": "eval", "submitted": "t1", "target": "runs/tiny/checkpoints/x"},
    ]
    (slurm_dir / "jobs.jsonl").write_text("".join(json.dumps(j) + "\n" for j in jobs))
    events = [
        {"job": "7", "attempt": 0, "event": "start", "checkpoint": "none"},
        {"job": "7", "attempt": 0, "event": "signal", "signal": "USR1"},
        {"job": "7", "attempt": 0, "event": "exit", "code": 75, "checkpoint": "step_13"},
        {"job": "7", "attempt": 0, "event": "requeue"},
        {"job": "7", "attempt": 1, "event": "start", "checkpoint": "step_13"},
        {"job": "7", "attempt": 1, "event": "exit", "code": 0, "checkpoint": "step_40"},
    ]
    (slurm_dir / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    (run_dir / "metrics.jsonl").write_text('{"step": 39}\n{"step": 40}\n')
    (run_dir / "checkpoints" / "latest").write_text("step_40")
    report = status(run_dir).splitlines()
    assert report[0] == f"run {run_dir}: last logged step 40, latest checkpoint step_40"
    assert report[1].split()[:3] == ["job", "7", "train"]
    assert report[2] == "  attempt 0: from none, signalled (USR1), exit 75 at step_13, requeued"
    assert report[3] == "  attempt 1: from step_13, exit 0 at step_40, finished"
    assert report[4].split()[:3] == ["job", "9", "eval"]
    assert len(report) == 5
