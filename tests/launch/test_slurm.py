"""launch.slurm without a cluster: the rendered job scripts (single jobs and job arrays), their
signal and requeue logic (run under stand-ins for srun and scontrol), the status report, and the
errors for bad input."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from launch.slurm import SlurmError, job_states, main, status, time_limit_seconds
from training.config import load_config, to_yaml

ROOT = Path(__file__).resolve().parents[2]
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


def job_body(script: str) -> str:
    """The script from the shared job body on (launch/slurm_job.sh)."""
    return script[script.index("\nEXIT_REQUEUE=") :]


def selected_run(script: str, **env: str) -> subprocess.CompletedProcess:
    """Run the lines before the job body in bash with SLURM's variables `env`; its stdout:
    RUN_DIR, CONFIG, JOB and TRAIN's words, one a line, as the job would use them."""
    prelude = script[: script.index("\nEXIT_REQUEUE=")]
    show = 'printf "%s\\n" "$RUN_DIR" "$CONFIG" "$JOB" "${TRAIN[@]}"'
    return subprocess.run(
        ["bash", "-c", f"{prelude}\n{show}"],
        env={"PATH": os.environ["PATH"], **env},
        capture_output=True,
        text=True,
        check=False,
    )


def srun_words(run_dir: Path, config: Path, tasks: int, cpus: int) -> list[str]:
    """The training command of a job: one task per GPU, rank logs under the run directory."""
    return [
        "srun",
        f"--ntasks-per-node={tasks}",
        f"--cpus-per-task={cpus}",
        f"--output={run_dir}/logs/rank-%t.log",
        "--open-mode=append",
        sys.executable,
        "-m",
        "launch.train",
        str(config),
    ]


def config_snapshot(run_dir: Path, config: Path, overrides: list[str]) -> Path:
    """Where a job keeps the config it trains: named by the resolved config's digest."""
    text = to_yaml(load_config(config, overrides))
    return run_dir / "slurm" / f"config-{hashlib.sha256(text.encode()).hexdigest()[:10]}.yaml"


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
    # One task per GPU, rank logs under the run directory, the resolved config snapshot; the
    # job is known by its id.
    snapshot = config_snapshot(run_dir, config, ["train.max_steps=7"])
    picked = selected_run(script, SLURM_JOB_ID="4242")
    assert picked.stdout.splitlines() == [
        str(run_dir),
        str(snapshot),
        "4242",
        *srun_words(run_dir, snapshot, tasks=8, cpus=12),
    ]
    assert not run_dir.exists()  # a dry run writes nothing
    # The signal is trapped and forwarded, training runs in the background so the trap can
    # fire, and only the requeue exit code requeues.
    assert "trap 'forward_signal TERM' TERM" in script
    assert 'kill -USR1 "$train_pid"' in script
    assert "EXIT_REQUEUE=75" in script and 'scontrol requeue "$JOB"' in script
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)


def write_study(directory: Path, schemes: list[str], slurm: dict) -> list[Path]:
    """A study as configs/study_gpu lays it out: a base file (the tiny config with `slurm`) and
    one config per scheme that builds on it and names its own run."""
    base = write_config(directory / "base.yaml", {"run": {"dir": "runs/study_gpu"}, "slurm": slurm})
    configs = []
    for scheme in schemes:
        config = directory / f"{scheme}.yaml"
        config.write_text(
            f"base: {base.name}\nrun:\n  name: {scheme}\nmodel:\n  scheme: {scheme}\n"
        )
        configs.append(config)
    return configs


def test_dry_run_array_of_3_configs_on_4_nodes_x_8_gpus(tmp_path, capsys, monkeypatch):
    schemes = ["rope", "alibi", "hybrid"]
    slurm = {**CLUSTER_4X8["slurm"], "job_name": None}  # default: the runs' parent directory
    configs = write_study(tmp_path, schemes, slurm)
    overrides = ["train.max_steps=7"]  # for every config
    script = render(["--array", *map(str, configs), *overrides], tmp_path, capsys, monkeypatch)
    runs = tmp_path / "runs" / "study_gpu"
    assert sbatch_options(script) == [
        "--job-name=study_gpu",
        "--array=0-2",  # one task per config
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
        f"--output={runs}/logs/array-%A_%a.out",  # the batch logs of all tasks, side by side
        "--open-mode=append",
        "--requeue",
        "--signal=B:USR1@600",
        "--exclusive",
        "--mail-type=END",
    ]
    # Task i trains config i (the overrides applied) in its own run directory, exactly as that
    # config's own job would, and is known by the id squeue shows for it.
    for task, (scheme, config) in enumerate(zip(schemes, configs, strict=True)):
        run_dir = runs / scheme
        snapshot = config_snapshot(run_dir, config, overrides)
        array_env = {"SLURM_ARRAY_JOB_ID": "500", "SLURM_ARRAY_TASK_ID": str(task)}
        picked = selected_run(script, **array_env, SLURM_JOB_ID=str(501 + task))
        assert picked.stdout.splitlines() == [
            str(run_dir),
            str(snapshot),
            f"500_{task}",
            *srun_words(run_dir, snapshot, tasks=8, cpus=12),
        ]
        own = render([str(config), *overrides], tmp_path, capsys, monkeypatch)
        assert (
            selected_run(own, SLURM_JOB_ID="7").stdout.splitlines()[3:]
            == (picked.stdout.splitlines()[3:])
        )
    # One job body, the same as a single job's: traps, setup lines, requeue on exit 75.
    assert job_body(script) == job_body(own)
    assert script.count("EXIT_REQUEUE=75") == 1
    lines = script.splitlines()
    traps = lines.index("trap 'forward_signal USR1' USR1")
    assert traps < lines.index("module load cuda/12.4") < lines.index('    "${TRAIN[@]}" &')
    assert "trap 'forward_signal TERM' TERM" in script and 'scontrol requeue "$JOB"' in script
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)
    # Outside an array, or as a task the array does not have, it stops at once.
    outside = selected_run(script, SLURM_JOB_ID="9")
    assert outside.returncode != 0 and "SLURM_ARRAY_TASK_ID: not set" in outside.stderr
    beyond = selected_run(script, SLURM_ARRAY_JOB_ID="500", SLURM_ARRAY_TASK_ID="3")
    assert beyond.returncode != 0 and "array task 3 has no run (tasks 0-2)" in beyond.stderr
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing


def test_array_configs_must_share_the_slurm_section(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cpu = {"gpus_per_node": 0, "time": "10:00"}
    a = write_config(tmp_path / "a.yaml", {"run": {"name": "a"}, "slurm": cpu})
    b = write_config(tmp_path / "b.yaml", {"run": {"name": "b"}, "slurm": {**cpu, "time": "20:00"}})
    c = write_config(tmp_path / "c.yaml", {"run": {"name": "c"}, "slurm": {**cpu, "qos": "low"}})
    assert main(["--array", str(a), str(b), str(c)]) == 2
    err = capsys.readouterr().err
    assert "slurm sections must be equal" in err
    assert f"'slurm.time': {a} '10:00', {b} '20:00', {c} '10:00'" in err
    assert f"'slurm.qos': {a} None, {b} None, {c} 'low'" in err
    assert "'slurm.gpus_per_node'" not in err  # only the keys that differ
    assert not (tmp_path / "runs").exists()
    # Overrides apply to every config: they can make the sections equal.
    args = ["--array", str(a), str(b), str(c), "slurm.time=30:00", "slurm.qos=low", "--dry-run"]
    assert main(args) == 0
    assert "#SBATCH --time=30:00\n" in capsys.readouterr().out


def test_array_configs_need_their_own_run_directories(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cpu = {"slurm": {"gpus_per_node": 0}}
    a = write_config(tmp_path / "a.yaml", {"run": {"name": "same"}, **cpu})
    b = write_config(tmp_path / "b.yaml", {"run": {"name": "other"}, **cpu})
    c = write_config(tmp_path / "c.yaml", {"run": {"name": "same"}, **cpu})
    assert main(["--array", str(a), str(b), str(c)]) == 2
    err = capsys.readouterr().err
    assert f"{a} and {c} both train {tmp_path / 'runs' / 'same'}" in err and "run.name" in err
    # An override that names every config's run the same does it too.
    assert main(["--array", str(a), str(b), "run.name=one", "--dry-run"]) == 2
    assert f"{a} and {b} both train {tmp_path / 'runs' / 'one'}" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
    # Several configs need --array, and --array needs configs.
    with pytest.raises(SystemExit):
        main([str(a), str(b), "--dry-run"])
    assert "submit them as one job array with --array" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--array", "train.max_steps=3", "--dry-run"])
    assert "--array needs configs" in capsys.readouterr().err


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


def test_slurm_section_of_the_base_file(tmp_path, capsys, monkeypatch):
    slurm = {"gpus_per_node": 0, "tasks_per_node": 3, "time": "45:00", "partition": "cpu"}
    base = write_config(tmp_path / "base.yaml", {"slurm": slurm})
    config = tmp_path / "child.yaml"
    config.write_text(f"base: {base.name}\nrun:\n  name: child\n")
    options = sbatch_options(render([str(config)], tmp_path, capsys, monkeypatch))
    for expected in ("--job-name=child", "--ntasks-per-node=3", "--time=45:00", "--partition=cpu"):
        assert expected in options
    # A base without one does not count.
    (tmp_path / "bare.yaml").write_text(TINY.read_text())
    config.write_text("base: bare.yaml\n")
    assert main([str(config), "--dry-run"]) == 2
    assert f"{config} has no 'slurm' section" in capsys.readouterr().err


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
    other = write_config(
        tmp_path / "other.yaml", {"run": {"name": "other"}, "slurm": {"gpus_per_node": 0}}
    )
    assert main(["--array", str(config), str(other)]) == 2
    assert "'sbatch' is not on PATH" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


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
    assert main(["--eval", str(run_dir), "model.n_layers=4", "--dry-run"]) == 2  # a valid key
    assert "cannot override model.n_layers=4 at evaluation" in capsys.readouterr().err


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
    array_task: int | None = None,
):
    """Run the rendered training script with srun and scontrol replaced by stand-ins, sending
    it `signal_name` once the file `signal_when` (in the stand-ins' directory) exists; with
    `array_task`, the script of an array of 3 configs (runs a, b, c) as that task of array 4240.
    (exit code, stdout, scontrol's arguments, the run's events, srun's arguments)."""
    fake = tmp_path / "bin"
    slurm = {"gpus_per_node": 0, "setup": ['touch "$FAKE/setup.started"; sleep 0.5']}
    if array_task is None:
        config = write_config(tmp_path / "cpu.yaml", {"slurm": slurm})
        args, run_dir, array_env = [str(config)], tmp_path / "runs" / "tiny", {}
    else:
        names = ["a", "b", "c"]
        configs = [
            write_config(tmp_path / f"{name}.yaml", {"run": {"name": name}, "slurm": slurm})
            for name in names
        ]
        args, run_dir = ["--array", *map(str, configs)], tmp_path / "runs" / names[array_task]
        array_env = {"SLURM_ARRAY_JOB_ID": "4240", "SLURM_ARRAY_TASK_ID": str(array_task)}
    script = tmp_path / "job.sh"
    script.write_text(render(args, tmp_path, capsys, monkeypatch))
    fake.mkdir()
    (fake / "srun").write_text(FAKE_SRUN)
    (fake / "scontrol").write_text('#!/bin/bash\necho "$@" >> "$FAKE/scontrol.args"\n')
    for tool in fake.iterdir():
        tool.chmod(0o755)
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
        **array_env,
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
    srun = (fake / "srun.args").read_text() if (fake / "srun.args").exists() else ""
    return job.returncode, out, scontrol.read_text() if scontrol.exists() else "", events, srun


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


def test_array_task_trains_its_config_and_requeues_only_itself(tmp_path, capsys, monkeypatch):
    code, out, scontrol, events, srun = run_job_script(
        tmp_path, capsys, monkeypatch, signal_when="srun.started", array_task=1
    )
    run_dir = tmp_path / "runs" / "b"
    # Task 1 trained the second config in its own run directory (the stand-in saved its
    # checkpoint there, and the events live there), and no other run was touched.
    assert f"--output={run_dir}/logs/rank-%t.log" in srun.split()
    assert Path(srun.split()[-1]).parent == run_dir / "slurm"
    assert not (tmp_path / "runs" / "a").exists() and not (tmp_path / "runs" / "c").exists()
    # Requeued by the id squeue shows for the task (its SLURM_JOB_ID, 4242, is the one that
    # could be the array's own id, which would requeue every task).
    assert code == 0 and scontrol == "requeue 4240_1\n"
    assert [e["event"] for e in events] == ["start", "signal", "exit", "requeue"]
    assert all(e["job"] == "4240_1" and e["attempt"] == 1 for e in events)
    assert events[2]["code"] == 75 and events[2]["checkpoint"] == "step_3"
    assert "requeueing job 4240_1; it resumes from step_3" in out


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


FAKE_SLURM = {  # stand-ins for the SLURM client commands a submission uses
    "sinfo": "echo debug",
    "squeue": 'cat "$FAKE/squeue.out"',
    "sbatch": 'cat > "$FAKE/sbatch.in"; echo 300',
}


def test_array_submission_checks_every_config_first(tmp_path, capsys, monkeypatch, stdlib_dataset):
    fake = tmp_path / "bin"
    fake.mkdir()
    for name, body in FAKE_SLURM.items():
        (fake / name).write_text(f"#!/bin/bash\n{body}\n")
        (fake / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE", str(fake))
    monkeypatch.chdir(tmp_path)
    runs = tmp_path / "runs"
    slurm = {"gpus_per_node": 0, "partition": "debug"}
    configs = [
        write_config(
            tmp_path / f"{name}.yaml",
            {"run": {"name": name}, "data": {"path": str(stdlib_dataset)}, "slurm": slurm},
        )
        for name in ("a", "b", "c")
    ]
    args = ["--array", *map(str, configs), "train.max_steps=5"]
    # The third config's dataset is missing: nothing is written or submitted, not even for the
    # first two.
    configs[2].write_text(configs[2].read_text().replace(str(stdlib_dataset), "nowhere"))
    assert main(args) == 2
    assert "nowhere is not a dataset" in capsys.readouterr().err
    assert not runs.exists() and not (fake / "sbatch.in").exists()
    configs[2].write_text(configs[2].read_text().replace("nowhere", str(stdlib_dataset)))

    # A job (here: a task of another array, not started yet) still trains the second run.
    (runs / "b" / "slurm").mkdir(parents=True)
    record = {"job": "77_1", "kind": "train", "submitted": "t0", "config": "slurm/config-x.yaml"}
    (runs / "b" / "slurm" / "jobs.jsonl").write_text(json.dumps(record) + "\n")
    (fake / "squeue.out").write_text("77_[1-3,6-10:2%2]|PENDING\n77_0|RUNNING\n80|COMPLETED\n")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"job 77_1 is already training {runs / 'b'} (PENDING)" in err and "scancel 77_1" in err
    assert not (runs / "a").exists() and not (fake / "sbatch.in").exists()
    assert job_states() == {
        **{f"77_{task}": "PENDING" for task in (1, 2, 3, 6, 8, 10)},
        "77_0": "RUNNING",
        "80": "COMPLETED",
    }

    # Once it has ended: one submission, each run records its task and keeps its config.
    (fake / "squeue.out").write_text("77_1|COMPLETED\n")
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"submitted training job array 300 of 3 tasks; batch logs {runs}/logs/array-" in out
    script = (fake / "sbatch.in").read_text()
    assert "--array=0-2" in sbatch_options(script)
    assert (runs / "logs").is_dir()  # sbatch would not create the batch logs' directory
    for task, (name, config) in enumerate(zip("abc", configs, strict=True)):
        run_dir = runs / name
        jobs = [json.loads(line) for line in (run_dir / "slurm" / "jobs.jsonl").open()]
        assert jobs[-1]["job"] == f"300_{task}" and jobs[-1]["source"] == str(config)
        assert (run_dir / jobs[-1]["script"]).read_text() == script
        snapshot = config_snapshot(run_dir, config, ["train.max_steps=5"])
        assert jobs[-1]["config"] == str(snapshot.relative_to(run_dir))
        assert load_config(snapshot) == load_config(config, ["train.max_steps=5"])
        assert f"task 300_{task}: {config}, run directory {run_dir}" in out
        assert (run_dir / "logs").is_dir()


INJECTED = '"x\\ntouch /tmp/rotalibi-injected\\n#"'  # YAML's \n escapes: two newlines


@pytest.mark.parametrize(
    "override",
    [
        f"run.name={INJECTED}",
        "run.name='a b'",  # would break --output
        *(
            f"slurm.{key}={INJECTED}"
            for key in ("partition", "account", "qos", "constraint", "mem", "job_name", "output")
        ),
        f'slurm.extra_sbatch=["--exclusive{INJECTED[1:]}]',
        "slurm.extra_sbatch=['--mail-user=a b']",
        "slurm.partition='gpu --exclusive'",  # another sbatch option
        "slurm.mem='4G;reboot'",
    ],
)
def test_no_config_value_reaches_the_batch_script_unchecked(
    override, tmp_path, capsys, monkeypatch
):
    """Every value written into the #SBATCH header or a comment takes a strict character set:
    a newline would add a shell line, a space another sbatch option."""
    monkeypatch.chdir(tmp_path)
    assert main([str(TINY), "slurm.time=10:00", override, "--dry-run"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "touch" not in captured.out
    assert "goes into the batch script, so use" in captured.err or "'run.name' is" in captured.err


def test_paths_in_the_batch_script_are_checked(tmp_path, capsys, monkeypatch):
    run_dir = make_run_dir(tmp_path, ["slurm.gpus_per_node=0"])
    odd = tmp_path / "x\ntouch p\n#"
    shutil.copytree(run_dir, odd)
    assert main(["--eval", str(odd), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "evaluation target is" in err and "goes into the batch script" in err
    spaced = tmp_path / "a b"
    spaced.mkdir()
    monkeypatch.chdir(spaced)  # the job's --chdir
    assert main([str(TINY), "slurm.time=10:00", "--dry-run"]) == 2
    assert "working directory is" in capsys.readouterr().err
    # The values that are fine render as they are.
    monkeypatch.chdir(tmp_path)
    good = ["slurm.constraint='h100&ib'", "slurm.extra_sbatch=['--gres=gpu:8', '--exclusive']"]
    options = sbatch_options(
        render([str(TINY), "slurm.time=10:00", *good], tmp_path, capsys, monkeypatch)
    )
    assert "--constraint=h100&ib" in options and "--gres=gpu:8" in options


def test_long_context_config_renders_and_sequence_groups_must_fit_the_job(
    tmp_path, capsys, monkeypatch
):
    """configs/7b_128k.yaml (sequence parallel 8 on 4 nodes x 8 GPUs) renders; on 4 GPUs its
    groups of 8 cannot form, which is one line before anything is written."""
    config = ROOT / "configs" / "7b_128k.yaml"
    script = render([str(config)], tmp_path, capsys, monkeypatch)
    options = sbatch_options(script)
    assert "--nodes=4" in options and "--ntasks-per-node=8" in options
    resolved = load_config(config, [])
    assert (resolved.train.sequence_parallel, resolved.data.seq_len) == (8, 131072)
    assert main([str(config), "slurm.nodes=1", "slurm.gpus_per_node=4", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith(
        "train.sequence_parallel=8 does not divide the 4 rank(s) of this job "
        "(slurm.nodes x tasks per node)"
    ), err
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------- written as checked


def header_is_whole(script: str) -> bool:
    """sbatch reads #SBATCH lines up to the first other line that is not blank or a comment:
    every option must come before it."""
    lines = script.splitlines()
    first_command = next(i for i, line in enumerate(lines) if line and not line.startswith("#"))
    return not any(line.startswith("#SBATCH") for line in lines[first_command:])


# A newline first (or anywhere): after `#SBATCH --time=` a bare line `24:00:00` would end the
# options (partition, chdir, output, requeue and signal lost); in a shell line, another command.
WRITTEN_FIELDS = [
    ('slurm.time="\\n24:00:00"', "'slurm.time'"),
    ('slurm.time=" \\nUNLIMITED"', "'slurm.time'"),
    ('slurm.time="24:00:00\\n"', "'slurm.time'"),
    ("slurm.time=' 24:00:00'", "'slurm.time'"),  # written as given, so checked as given
    ('slurm.eval_time="\\n04:00:00"', "'slurm.eval_time'"),
    ('slurm.eval_time=" \\nUNLIMITED"', "'slurm.eval_time'"),
    *((f'slurm.{key}="\\nx1"', f"'slurm.{key}'") for key in ("partition", "account", "qos")),
    *((f'slurm.{key}="\\nx1"', f"'slurm.{key}'") for key in ("constraint", "job_name")),
    ('slurm.mem="\\n4G"', "'slurm.mem'"),
    ('slurm.output="\\nlogs/%j.out"', "'slurm.output'"),
    ('slurm.extra_sbatch=["\\n--exclusive"]', "'slurm.extra_sbatch'"),
    ('slurm.extra_sbatch=["--exclusive\\r"]', "'slurm.extra_sbatch'"),
    ('slurm.setup=["\\nmodule load cuda"]', "'slurm.setup'"),
    ('slurm.setup=["module load cuda\\rrm -rf x"]', "'slurm.setup'"),
    ('slurm.setup=["echo \\u001b[2J"]', "'slurm.setup'"),  # an escape sequence
    ('slurm.env={NCCL_DEBUG: "\\nINFO"}', "'slurm.env'"),
    ('slurm.env={"NCCL_DEBUG\\n": INFO}', "'slurm.env'"),
    ('run.name="\\ntiny"', "'run.name'"),
]


@pytest.mark.parametrize(("override", "named"), WRITTEN_FIELDS)
def test_every_written_field_is_checked_exactly_as_written(
    override, named, tmp_path, capsys, monkeypatch
):
    """No control character reaches the batch script, in any field, and a value is written
    exactly as it was checked (nothing stripped in between)."""
    monkeypatch.chdir(tmp_path)
    assert main([str(TINY), "slurm.gpus_per_node=0", override, "--dry-run"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # no script
    assert named in captured.err
    run_dir = make_run_dir(tmp_path, ["slurm.gpus_per_node=0"])
    if "slurm." in override:  # the evaluation job takes the same slurm section
        assert main(["--eval", str(run_dir), override, "--dry-run"]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and named in captured.err


def test_evaluation_arguments_take_no_control_characters(tmp_path, capsys, monkeypatch):
    run_dir = make_run_dir(tmp_path, ["slurm.gpus_per_node=0"])
    monkeypatch.chdir(tmp_path)
    for args in (["eval.lengths=[64,\n128]"], ["--", "--out=a\nb"]):
        assert main(["--eval", str(run_dir), "--dry-run", *args]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and "launch.evaluate's argument is" in captured.err
        assert "no control characters" in captured.err


def test_written_values_render_as_checked(tmp_path, capsys, monkeypatch):
    """The values that pass are written unchanged, and the options stay one block."""
    config = write_config(tmp_path / "big.yaml", CLUSTER_4X8)
    for time_limit in ("UNLIMITED", "1-12:00:00", "90"):
        script = render(
            [str(config), f"slurm.time={time_limit}", 'slurm.setup=["\\tmodule load cuda"]'],
            tmp_path,
            capsys,
            monkeypatch,
        )
        assert f"--time={time_limit}" in sbatch_options(script) and header_is_whole(script)
        assert "\n\tmodule load cuda\n" in script  # a tab in a shell line is shell's whitespace
        assert sbatch_options(script)[-3:] == [
            "--signal=B:USR1@600",
            "--exclusive",
            "--mail-type=END",
        ]
    run_dir = make_run_dir(tmp_path, ["slurm.gpus_per_node=0", "slurm.eval_time=UNLIMITED"])
    script = render(["--eval", str(run_dir)], tmp_path, capsys, monkeypatch)
    assert "--time=UNLIMITED" in sbatch_options(script) and header_is_whole(script)
    for text in ("\n24:00:00", " \nUNLIMITED", "24:00:00 ", "１０"):  # fullwidth digits
        with pytest.raises(SlurmError, match="not in a SLURM format"):
            time_limit_seconds(text)


SHELL_SETUP = [
    "source ${HOME}/venv/bin/activate",
    'echo "job ${SLURM_JOB_ID:-none} in ${PWD##*/}"',
    "echo \\${HOME} is literal",  # the shell's own escape, kept too
    "echo ${",  # not an interpolation OmegaConf could even parse
]


def test_setup_lines_keep_shell_variables(tmp_path, capsys, monkeypatch):
    """slurm.setup lines are shell, written as they are: their ${...} are the shell's. Elsewhere
    an interpolation is refused as before, in a file or an override."""
    config = write_config(tmp_path / "shell.yaml", {"slurm": {"setup": SHELL_SETUP}})
    script = render([str(config), "slurm.gpus_per_node=0"], tmp_path, capsys, monkeypatch)
    lines = script.splitlines()
    start = lines.index("# slurm.setup")
    assert lines[start + 1 : start + 1 + len(SHELL_SETUP)] == SHELL_SETUP
    # The job's own copy of the config (what launch.train reads) keeps them too.
    override = 'slurm.setup=["cd ${TMPDIR}"]'
    snapshot = to_yaml(load_config(config, [override]))
    copy = tmp_path / "copy.yaml"
    copy.write_text(snapshot)
    assert load_config(copy).slurm.setup == ["cd ${TMPDIR}"]
    assert to_yaml(load_config(copy)) == snapshot
    # The shell expands them.
    bash = subprocess.run(
        ["bash", "-c", "\n".join(SHELL_SETUP[1:3])],
        env={"PATH": os.environ["PATH"], "HOME": "/home/me", "SLURM_JOB_ID": "7"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    assert bash.stdout.splitlines() == [f"job 7 in {tmp_path.name}", "${HOME} is literal"]
    # Anywhere else ${...} stays refused (OmegaConf would resolve it).
    monkeypatch.chdir(tmp_path)
    for other in ("run.name=${HOME}", "slurm.env={A: '${HOME}'}", "slurm.partition=${oc.env:U}"):
        assert main([str(config), other, "--dry-run"]) == 2
        assert "is an interpolation" in capsys.readouterr().err
    bad = write_config(tmp_path / "bad.yaml", {"slurm": {"setup": [], "job_name": "${HOME}"}})
    assert main([str(bad), "--dry-run"]) == 2
    assert "'${HOME}' is an interpolation" in capsys.readouterr().err
