"""Training and evaluation as SLURM jobs: render the batch script, submit it, report on a run.

    python -m launch.slurm CONFIG.yaml [key=value ...] [--dry-run]     submit a training job
    python -m launch.slurm --eval RUN_DIR_OR_CHECKPOINT [key=value ...] [--dry-run]
                           [-- LAUNCH_EVALUATE_OPTIONS]                submit an evaluation job
    python -m launch.slurm --status RUN_DIR                            the run's jobs and steps

A training job runs one task per GPU (`slurm.tasks_per_node` of them on CPU nodes) with
`srun ... python -m launch.train`; every task maps SLURM's variables to torch.distributed's
(launch/distributed.py). SLURM signals the batch script `slurm.signal_lead_s` seconds before
the time limit (or a user with `scancel -b -s USR1 JOB`); it forwards USR1 to the ranks, which
save a checkpoint and exit with EXIT_REQUEUE, and the script requeues the job, which resumes
from that checkpoint in the same run directory. `--dry-run` prints the script and submits
nothing. The run directory keeps the job scripts, the resolved config each job trains with,
the batch and per-rank logs (`logs/`) and the jobs' events (`slurm/`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shlex
import shutil
import subprocess
import sys
from datetime import datetime
from pathlib import Path

from launch.config import Config, ConfigError, SlurmConfig, file_layers, load_config, to_yaml

JOB_BODY = Path(__file__).with_name("slurm_job.sh")
MAX_SIGNAL_LEAD_S = 65535  # SLURM's limit for --signal=...@<seconds>
TIME_KEYS = ("time", "eval_time")  # slurm keys in SLURM's time formats
# squeue states of a job that may still run (anything else has ended).
ACTIVE_STATES = {
    "PENDING",
    "RUNNING",
    "CONFIGURING",
    "COMPLETING",
    "REQUEUED",
    "REQUEUE_FED",
    "REQUEUE_HOLD",
    "RESIZING",
    "SIGNALING",
    "STAGE_OUT",
    "STOPPED",
    "SUSPENDED",
}


class SlurmError(ValueError):
    """A problem with the SLURM set-up or request, stated with the fix."""


# ---------------------------------------------------------------- checking the slurm section


def time_limit_seconds(text: str) -> int | None:
    """SLURM's time formats (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) in seconds; None: unlimited."""
    if text.strip().upper() in ("UNLIMITED", "INFINITE"):
        return None
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if match is None:
        raise SlurmError(
            f"time limit {text!r} is not in a SLURM format: minutes, MM:SS, HH:MM:SS, D-HH, "
            "D-HH:MM or D-HH:MM:SS"
        )
    days, *rest = match.groups()
    parts = [int(p) for p in rest if p is not None]
    if days is not None:  # D-H[:M[:S]]
        hours, minutes, seconds = parts + [0] * (3 - len(parts))
        return ((int(days) * 24 + hours) * 60 + minutes) * 60 + seconds
    if len(parts) == 3:  # H:M:S
        return (parts[0] * 60 + parts[1]) * 60 + parts[2]
    return parts[0] * 60 + (parts[1] if len(parts) == 2 else 0)  # M or M:S


def tasks_per_node(slurm: SlurmConfig) -> int:
    """One task per GPU; on CPU nodes `slurm.tasks_per_node` (default 1)."""
    if slurm.tasks_per_node is not None:
        return slurm.tasks_per_node
    return max(slurm.gpus_per_node, 1)


def _sbatch_option(line: str) -> str:
    return line.strip().removeprefix("#SBATCH").strip()


def check_slurm(slurm: SlurmConfig) -> None:
    """Raise SlurmError listing every problem of a slurm section that sbatch would trip over."""
    problems = []
    limits = {}
    for key in TIME_KEYS:
        try:
            limits[key] = time_limit_seconds(getattr(slurm, key))
        except SlurmError as e:
            problems.append(f"'slurm.{key}': {e}")
    limit = limits.get("time")
    if limit is not None and slurm.signal_lead_s >= limit:
        problems.append(
            f"'slurm.signal_lead_s' is {slurm.signal_lead_s} s, not less than 'slurm.time' "
            f"{slurm.time!r} ({limit} s): the job would be told to stop as it starts; lower it"
        )
    if slurm.signal_lead_s > MAX_SIGNAL_LEAD_S:
        problems.append(f"'slurm.signal_lead_s' must be <= {MAX_SIGNAL_LEAD_S} (SLURM's limit)")
    if slurm.gpus_per_node > 0 and slurm.tasks_per_node not in (None, slurm.gpus_per_node):
        problems.append(
            f"'slurm.tasks_per_node' is {slurm.tasks_per_node} but 'slurm.gpus_per_node' is "
            f"{slurm.gpus_per_node}: training runs one task per GPU; leave tasks_per_node unset "
            "(it is for CPU nodes, gpus_per_node=0)"
        )
    for key in slurm.env:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(key)):
            problems.append(f"'slurm.env' key {key!r} is not a valid environment variable name")
    for line in slurm.extra_sbatch:
        if not _sbatch_option(line).startswith("-"):
            problems.append(
                f"'slurm.extra_sbatch' entry {line!r} is not an sbatch option (e.g. --exclusive)"
            )
    if problems:
        raise SlurmError("invalid slurm section:\n  - " + "\n  - ".join(problems))


def require_slurm_section(config_path: Path, overrides: list[str]) -> None:
    """A training job needs the cluster's own settings, not the schema's placeholders."""
    layers = [layer for layer, _ in file_layers(config_path)]
    if any("slurm" in layer for layer in layers) or any(o.startswith("slurm.") for o in overrides):
        return
    raise SlurmError(
        f"{config_path} has no 'slurm' section: add one with your cluster's settings (nodes, "
        "gpus_per_node, time, partition, account; configs/7b.yaml has an example) or give "
        "them as overrides, e.g. slurm.partition=gpu slurm.nodes=2"
    )


# ---------------------------------------------------------------- rendering


def _header(
    slurm: SlurmConfig,
    *,
    job_name: str,
    nodes: int,
    tasks: int,
    gpus: int,
    time: str,
    workdir: Path,
    output: str,
) -> list[str]:
    options = [
        f"--job-name={job_name}",
        f"--nodes={nodes}",
        f"--ntasks-per-node={tasks}",
        *([f"--gpus-per-node={gpus}"] if gpus else []),
        f"--cpus-per-task={slurm.cpus_per_task}",
        *([f"--mem={slurm.mem}"] if slurm.mem else []),
        f"--time={time}",
        *(
            f"--{name}={value}"
            for name in ("partition", "account", "qos", "constraint")
            if (value := getattr(slurm, name))
        ),
        f"--chdir={workdir}",
        f"--output={output}",
        "--open-mode=append",  # a requeued job appends to its first attempt's log
        "--requeue",
    ]
    return [f"#SBATCH {option}" for option in options]


def _environment(slurm: SlurmConfig) -> list[str]:
    lines = []
    if slurm.setup:
        lines += ["# slurm.setup", *slurm.setup]
    if slurm.env:
        lines += ["# slurm.env"]
        lines += [f"export {key}={shlex.quote(str(value))}" for key, value in slurm.env.items()]
    return lines


def batch_log(cfg: Config, run_dir: Path) -> str:
    return cfg.slurm.output or str(run_dir / "logs" / "slurm-%j.out")


def _setup_block(slurm: SlurmConfig) -> str:
    lines = _environment(slurm)
    return "\n" + "".join(line + "\n" for line in lines) + ("\n" if lines else "")


def render_train_script(
    cfg: Config, *, config_file: Path, workdir: Path, python: str = sys.executable
) -> str:
    """The batch script of a training job that trains the config saved at `config_file`."""
    slurm = cfg.slurm
    run_dir = (workdir / cfg.run_dir).resolve()
    tasks = tasks_per_node(slurm)
    header = _header(
        slurm,
        job_name=slurm.job_name or cfg.run.name,
        nodes=slurm.nodes,
        tasks=tasks,
        gpus=slurm.gpus_per_node,
        time=slurm.time,
        workdir=workdir,
        output=batch_log(cfg, run_dir),
    )
    header.append(f"#SBATCH --signal=B:USR1@{slurm.signal_lead_s}")
    header += [f"#SBATCH {_sbatch_option(line)}" for line in slurm.extra_sbatch]
    srun = [
        "srun",
        f"--ntasks-per-node={tasks}",
        f"--cpus-per-task={slurm.cpus_per_task}",
        f"--output={run_dir / 'logs' / 'rank-%t.log'}",
        "--open-mode=append",
        python,
        "-m",
        "launch.train",
        str(config_file),
    ]
    lines = [
        "#!/bin/bash",
        f"# rotalibi training job for {run_dir}: rendered by `python -m launch.slurm`.",
        *header,
        "",
        f"RUN_DIR={shlex.quote(str(run_dir))}",
        f"TRAIN=({shlex.join(srun)})",
        "",
        # After the signal traps: a stop signal during slow setup lines is not lost.
        JOB_BODY.read_text().rstrip().replace("\n@SETUP@\n", _setup_block(slurm)),
    ]
    return "\n".join(lines) + "\n"


def render_eval_script(
    cfg: Config,
    *,
    target: Path,
    run_dir: Path,
    arguments: list[str],
    workdir: Path,
    python: str = sys.executable,
) -> str:
    """The batch script of an evaluation job: one task (one GPU on GPU nodes) that runs
    `launch.evaluate TARGET ARGUMENTS...`; a preempted evaluation starts again."""
    slurm = cfg.slurm
    header = _header(
        slurm,
        job_name=f"{slurm.job_name or cfg.run.name}-eval",
        nodes=1,
        tasks=1,
        gpus=min(slurm.gpus_per_node, 1),
        time=slurm.eval_time,
        workdir=workdir,
        output=str(run_dir / "logs" / "eval-%j.out"),
    )
    header += [f"#SBATCH {_sbatch_option(line)}" for line in slurm.extra_sbatch]
    command = [python, "-m", "launch.evaluate", str(target), *arguments]
    lines = [
        "#!/bin/bash",
        f"# rotalibi evaluation job for {target}: rendered by `python -m launch.slurm --eval`.",
        *header,
        "",
        *_environment(slurm),
        'echo "rotalibi: evaluation job $SLURM_JOB_ID on $SLURM_JOB_NODELIST"',
        shlex.join(["srun", "--ntasks=1", f"--cpus-per-task={slurm.cpus_per_task}", *command]),
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- talking to SLURM


def _slurm_command(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise SlurmError(
            f"'{name}' is not on PATH: this machine has no SLURM client commands. Submit from "
            "the cluster's login node (or install slurm-client); --dry-run prints the job "
            "script without SLURM"
        )
    return path


def _run(command: list[str], *, stdin: str | None = None) -> str:
    executable = _slurm_command(command[0])
    result = subprocess.run(
        [executable, *command[1:]], input=stdin, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        message = (result.stderr or result.stdout).strip()
        raise SlurmError(f"`{shlex.join(command)}` failed: {message}")
    return result.stdout


def check_partition(partition: str | None) -> None:
    """Fail before submitting when the partition does not exist (sinfo lists the real ones)."""
    if partition is None:
        return
    partitions = _run(["sinfo", "--noheader", "--format=%R"]).split()
    unknown = [p for p in partition.split(",") if p not in partitions]  # sbatch takes a list
    if unknown:
        raise SlurmError(
            f"partition {', '.join(map(repr, unknown))} (slurm.partition) does not exist on this "
            f"cluster; its partitions: {', '.join(sorted(set(partitions))) or 'none'}"
        )


def job_states() -> dict[str, str]:
    """State of every job the controller still knows (finished ones for MinJobAge)."""
    out = _run(["squeue", "--noheader", "--states=all", "--format=%i|%T"])
    return dict(line.split("|", 1) for line in out.splitlines() if "|" in line)


def _jobs_file(run_dir: Path) -> Path:
    return run_dir / "slurm" / "jobs.jsonl"


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _refuse_second_training_job(run_dir: Path) -> None:
    """Two jobs training one run directory would overwrite each other's checkpoints."""
    ours = [j["job"] for j in _read_jsonl(_jobs_file(run_dir)) if j["kind"] == "train"]
    if not ours:
        return
    states = job_states()
    for job in ours:
        if states.get(job) in ACTIVE_STATES:
            raise SlurmError(
                f"job {job} is already training {run_dir} ({states[job]}); wait for it, "
                f"cancel it (scancel {job}), or choose another run.name"
            )


def submit(script: str, *, run_dir: Path, kind: str, detail: dict) -> str:
    """Submit `script` with sbatch; record the job under run_dir/slurm; return its id."""
    out = _run(["sbatch", "--parsable"], stdin=script)
    job = out.strip().split(";")[0]
    slurm_dir = run_dir / "slurm"
    (slurm_dir / f"job-{job}.sh").write_text(script)
    record = {
        "job": job,
        "kind": kind,
        "submitted": datetime.now().isoformat(timespec="seconds"),
        "script": f"slurm/job-{job}.sh",
        **detail,
    }
    with _jobs_file(run_dir).open("a") as f:
        f.write(json.dumps(record) + "\n")
    return job


def _prepare_dirs(run_dir: Path, output: str) -> None:
    """sbatch does not create the log's directory (the job would fail silently)."""
    for directory in (run_dir / "logs", run_dir / "slurm", Path(output).parent):
        if "%" not in str(directory):
            directory.mkdir(parents=True, exist_ok=True)


# ---------------------------------------------------------------- the three commands


def submit_training(config_path: Path, overrides: list[str], *, dry_run: bool) -> int:
    cfg = load_config(config_path, overrides)
    require_slurm_section(config_path, overrides)
    check_slurm(cfg.slurm)
    workdir = Path.cwd()
    run_dir = (workdir / cfg.run_dir).resolve()
    config_text = to_yaml(cfg)
    digest = hashlib.sha256(config_text.encode()).hexdigest()[:10]
    config_file = run_dir / "slurm" / f"config-{digest}.yaml"
    script = render_train_script(cfg, config_file=config_file, workdir=workdir)
    if dry_run:
        print(script, end="")
        return 0
    _slurm_command("sbatch")  # before anything is written
    check_partition(cfg.slurm.partition)
    check_trainable(cfg)
    _refuse_second_training_job(run_dir)
    _prepare_dirs(run_dir, batch_log(cfg, run_dir))
    config_file.write_text(config_text)
    job = submit(
        script,
        run_dir=run_dir,
        kind="train",
        detail={"config": str(config_file.relative_to(run_dir)), "source": str(config_path)},
    )
    print(f"submitted training job {job}; run directory {run_dir}")
    print(f"progress: python -m launch.slurm --status {run_dir}")
    return 0


def check_trainable(cfg: Config) -> None:
    """What launch.train checks first (dataset, a run directory of another model), checked now:
    a job would otherwise wait in the queue only to stop at once."""
    from data.manifest import DatasetError
    from launch.train import RunDirError, check_dataset, resume_point

    try:
        check_dataset(cfg)
        resume_point(cfg)
    except (ConfigError, DatasetError, RunDirError) as e:
        raise SlurmError(f"{e} (checked before submitting)") from None


def find_run_dir(target: Path) -> Path:
    """The run directory of a run directory or of one of its checkpoints."""
    for candidate in (target, target.parent.parent):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise SlurmError(
        f"{target} is neither a run directory nor a checkpoint of one (no config.yaml in it "
        "or two levels up); give runs/<name> or runs/<name>/checkpoints/step_<N>"
    )


def submit_evaluation(
    target: Path, overrides: list[str], options: list[str], *, dry_run: bool
) -> int:
    """Overrides (slurm.* for the job, the rest for launch.evaluate) and launch.evaluate's own
    options (--all, --step N, --out DIR, ...)."""
    if not target.exists():
        raise SlurmError(f"{target} does not exist; give runs/<name> or one of its checkpoints")
    workdir = Path.cwd()
    target = target.resolve()
    run_dir = find_run_dir(target)
    cfg = load_config(run_dir / "config.yaml", overrides)  # a wrong key fails here, not queued
    check_slurm(cfg.slurm)
    arguments = [o for o in overrides if not o.startswith("slurm.")] + options
    script = render_eval_script(
        cfg, target=target, run_dir=run_dir, arguments=arguments, workdir=workdir
    )
    if dry_run:
        print(script, end="")
        return 0
    _slurm_command("sbatch")
    check_partition(cfg.slurm.partition)
    _prepare_dirs(run_dir, str(run_dir / "logs" / "eval"))
    job = submit(
        script,
        run_dir=run_dir,
        kind="eval",
        detail={"target": str(target), "arguments": arguments},
    )
    print(f"submitted evaluation job {job} for {target}; run directory {run_dir}")
    return 0


def _last_step(run_dir: Path) -> int | None:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return None
    lines = [line for line in metrics.read_text().splitlines() if line.strip()]
    return json.loads(lines[-1])["step"] if lines else None


def _describe_attempt(events: list[dict]) -> str:
    start = next((e for e in events if e["event"] == "start"), None)
    end = next((e for e in events if e["event"] == "exit"), None)
    text = f"from {start['checkpoint']}" if start else "start not recorded"
    for signal in (e for e in events if e["event"] == "signal"):
        text += f", signalled ({signal.get('signal', '?')})"
    if end is None:
        return text + ", running (or killed)"
    text += f", exit {end['code']} at {end['checkpoint']}"
    if any(e["event"] == "requeue" for e in events):
        text += ", requeued"
    elif end["code"] == 0:
        text += ", finished"
    return text


def status(run_dir: Path) -> str:
    """The run's jobs: id, kind, SLURM state, and per attempt the checkpoints it went between."""
    jobs = _read_jsonl(_jobs_file(run_dir))
    if not jobs:
        raise SlurmError(
            f"{run_dir} has no SLURM jobs recorded ({_jobs_file(run_dir)} is missing); was it "
            "submitted with python -m launch.slurm?"
        )
    events = _read_jsonl(run_dir / "slurm" / "events.jsonl")
    try:
        states = job_states()
    except SlurmError:  # no controller here: the events still tell the story
        states = {}
    latest = run_dir / "checkpoints" / "latest"
    lines = [
        f"run {run_dir}: last logged step {_last_step(run_dir)}, latest checkpoint "
        f"{latest.read_text().strip() if latest.is_file() else 'none'}"
    ]
    for job in jobs:
        state = states.get(job["job"], "(not in squeue)")
        what = job.get("target", job.get("config", ""))
        lines.append(f"job {job['job']}  {job['kind']:<5}  {state:<12}  {job['submitted']}  {what}")
        mine = [e for e in events if e["job"] == job["job"]]
        for attempt in sorted({e["attempt"] for e in mine}):
            this = [e for e in mine if e["attempt"] == attempt]
            lines.append(f"  attempt {attempt}: {_describe_attempt(this)}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m launch.slurm",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("args", nargs="*", help="CONFIG.yaml then key=value overrides")
    parser.add_argument("--dry-run", action="store_true", help="print the job script only")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--eval", metavar="RUN_DIR_OR_CHECKPOINT", type=Path)
    what.add_argument("--status", metavar="RUN_DIR", type=Path)
    options = []  # after `--`: launch.evaluate's own options
    if "--" in argv:
        argv, options = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
    args = parser.parse_intermixed_args(argv)
    if options and args.eval is None:
        parser.error("options after -- go to launch.evaluate: they need --eval")
    try:
        if args.status is not None:
            if args.args or args.dry_run:
                parser.error("--status takes only the run directory")
            print(status(args.status))
            return 0
        if args.eval is not None:
            return submit_evaluation(args.eval, args.args, options, dry_run=args.dry_run)
        if not args.args:
            parser.error("give a config (e.g. configs/7b.yaml), --eval TARGET or --status RUN_DIR")
        return submit_training(Path(args.args[0]), args.args[1:], dry_run=args.dry_run)
    except (ConfigError, SlurmError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
