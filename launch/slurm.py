"""Training and evaluation as SLURM jobs: render the batch script, submit it, report on a run.

    python -m launch.slurm CONFIG.yaml [key=value ...] [--dry-run]     submit a training job
    python -m launch.slurm --array CONFIG.yaml [CONFIG.yaml ...] [key=value ...] [--dry-run]
                                                          one job array: a task per config
    python -m launch.slurm --eval RUN_DIR_OR_CHECKPOINT [key=value ...] [--dry-run]
                           [-- LAUNCH_EVALUATE_OPTIONS]                submit an evaluation job
    python -m launch.slurm --status RUN_DIR                            the run's jobs and steps

A training job runs one task per GPU (`slurm.tasks_per_node` of them on CPU nodes) with
`srun ... python -m launch.train`; every task maps SLURM's variables to torch.distributed's
(training/distributed.py). SLURM signals the batch script `slurm.signal_lead_s` seconds before
the time limit (or a user with `scancel -b -s USR1 JOB`); it forwards USR1 to the ranks, which
save a checkpoint and exit with EXIT_REQUEUE, and the script requeues the job, which resumes
from that checkpoint in the same run directory. `--dry-run` prints the script and submits
nothing. The run directory keeps the job scripts, the resolved config each job trains with,
the batch and per-rank logs (`logs/`) and the jobs' events (`slurm/`).

A job array (`--array`, e.g. one config per position scheme) is one submission whose task i
trains config i exactly as its own job would, in its own run directory; the overrides apply to
every config, and the configs must share their `slurm` section. A task is known by the id
squeue shows for it, "<array id>_<task>", in its run's records and events and when it requeues.
The array's batch logs go to `slurm.output`, else `<the runs' common parent>/logs/array-%A_%a.out`
(runs/study/logs/... when they share run.dir=runs/study); its job name is `slurm.job_name`, else
that parent's name.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import unicodedata
from dataclasses import dataclass, fields
from datetime import datetime
from pathlib import Path

from training.config import (
    Config,
    ConfigError,
    SlurmConfig,
    check_evaluation_overrides,
    file_layers,
    load_config,
    sequence_parallel_problems,
    tasks_per_node,
    to_yaml,
)

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
    if text.upper() in ("UNLIMITED", "INFINITE"):
        return None
    # Exactly as written (no strip): this text is what the batch script gets.
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text, flags=re.ASCII)
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


def _sbatch_option(line: str) -> str:
    return line.strip().removeprefix("#SBATCH").strip()


# What may reach the batch script: a value with a newline would add a shell line, one with a
# space another sbatch option. Each field takes a strict character set, stated in the error.
NAME = (r"[A-Za-z0-9._-]+", "letters, digits and . _ -")
PATH = (r"[A-Za-z0-9._/%+=@,:~-]+", "letters, digits and . _ / % + = @ , : ~ -, no spaces")
SBATCH_VALUE = r"[A-Za-z0-9._/%+=@,:~&|*\[\]()!-]+"
SCRIPT_FIELDS = {
    "partition": (r"[A-Za-z0-9._-]+(,[A-Za-z0-9._-]+)*", "letters, digits, . _ -, and commas"),
    "account": NAME,
    "qos": NAME,
    "job_name": NAME,
    "constraint": (SBATCH_VALUE, "features and the operators & | , * [ ] ( ) !, no spaces"),
    "mem": (r"[0-9]+[KMGT]?", "a number and an optional unit K, M, G or T, e.g. 480G"),
    "output": PATH,
}  # fmt: skip
SBATCH_OPTION = (
    rf"--[A-Za-z][A-Za-z0-9-]*(={SBATCH_VALUE})?",
    "a long sbatch option, --name or --name=value, the value without spaces or quotes "
    "(e.g. --exclusive, --gres=gpu:8)",
)


def script_value_problem(what: str, value: str, rule: tuple[str, str]) -> str | None:
    """Why `value` may not be written into a batch script as `what`; None when it may."""
    pattern, description = rule
    if re.fullmatch(pattern, value):
        return None
    return f"{what} is {value!r}; it goes into the batch script, so use {description}"


def control_characters(value: str, allowed: str = "") -> list[str]:
    """The control characters (newline, carriage return, escape, ...) in `value`, less those
    `allowed`, as they would be typed in Python."""
    found = {c for c in value if unicodedata.category(c) == "Cc" and c not in allowed}
    return sorted(repr(c)[1:-1] for c in found)


def control_character_problem(what: str, value: str, allowed: str = "") -> str | None:
    """Why `value` may not be written into a batch script as `what`: a control character (a
    newline would end a line of the script early, the rest becoming another line)."""
    if found := control_characters(value, allowed):
        return (
            f"{what} is {value!r}; it goes into the batch script, so use no control "
            f"characters (it has {', '.join(found)})"
        )
    return None


def check_script_arguments(what: str, arguments: list[str]) -> None:
    """Arguments written (quoted) into the batch script's command line."""
    problems = [
        problem for argument in arguments if (problem := control_character_problem(what, argument))
    ]
    if problems:
        raise SlurmError("; ".join(problems))


def _written_fields(slurm: SlurmConfig) -> dict[str, list[str]]:
    """Every text of the slurm section, by key: written into the batch script as it is."""
    texts = {}
    for f in fields(SlurmConfig):
        value = getattr(slurm, f.name)
        if isinstance(value, dict):
            texts[f.name] = [str(x) for item in value.items() for x in item]
        elif isinstance(value, list):
            texts[f.name] = [str(x) for x in value]
        elif isinstance(value, str):
            texts[f.name] = [value]
    return texts


def check_script_paths(**paths: Path) -> None:
    """Paths written into the batch script (working directory, run directories, targets)."""
    problems = [
        problem
        for what, path in paths.items()
        if (problem := script_value_problem(what.replace("_", " "), str(path), PATH))
    ]
    if problems:
        raise SlurmError("; ".join(problems))


def check_slurm(slurm: SlurmConfig) -> None:
    """Raise SlurmError listing every problem of a slurm section that sbatch would trip over."""
    problems = []
    # No control character in any text that the script gets (the keys with a character set
    # of their own are checked against it below): setup lines (shell) may hold tabs.
    garbled = set()
    for key, texts in _written_fields(slurm).items():
        if key in SCRIPT_FIELDS:
            continue
        allowed = "\t" if key == "setup" else ""
        for text in texts:
            if problem := control_character_problem(f"'slurm.{key}'", text, allowed):
                problems.append(problem)
                garbled.add(key)
    limits = {}
    for key in TIME_KEYS:
        if key in garbled:
            continue
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
    for key, rule in SCRIPT_FIELDS.items():
        value = getattr(slurm, key)
        if value is not None and (
            problem := script_value_problem(f"'slurm.{key}'", str(value), rule)
        ):
            problems.append(problem)
    for line in slurm.extra_sbatch if "extra_sbatch" not in garbled else ():
        if not _sbatch_option(line).startswith("-"):
            problems.append(
                f"'slurm.extra_sbatch' entry {line!r} is not an sbatch option (e.g. --exclusive)"
            )
        elif problem := script_value_problem(
            "'slurm.extra_sbatch' entry", _sbatch_option(line), SBATCH_OPTION
        ):
            problems.append(problem)
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
    array_size: int | None = None,
) -> list[str]:
    options = [
        f"--job-name={job_name}",
        *([f"--array=0-{array_size - 1}"] if array_size is not None else []),
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
    return [_sbatch_line(option) for option in options]


def _sbatch_line(option: str) -> str:
    """An `#SBATCH` line, checked as written: one option of printable characters, no space (a
    newline in it would end sbatch's reading of options: those after it would be lost)."""
    if not re.fullmatch(r"--[A-Za-z][A-Za-z0-9-]*(=[!-~]+)?", option):
        raise SlurmError(f"{option!r} cannot be an #SBATCH line: one --option[=value], printable")
    return f"#SBATCH {option}"


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


@dataclass
class TrainingRun:
    """One config to train: the file given, what it resolved to, where it trains."""

    source: Path
    cfg: Config
    run_dir: Path  # absolute
    config_text: str  # the resolved config, saved for the job to read
    config_file: Path  # where: <run_dir>/slurm/config-<digest>.yaml


def training_run(config_path: Path, overrides: list[str], workdir: Path) -> TrainingRun:
    """Resolve one config of a training job (a wrong key or value, or no slurm section, fails)."""
    cfg = load_config(config_path, overrides)
    require_slurm_section(config_path, overrides)
    run_dir = (workdir / cfg.run_dir).resolve()
    config_text = to_yaml(cfg)
    digest = hashlib.sha256(config_text.encode()).hexdigest()[:10]
    config_file = run_dir / "slurm" / f"config-{digest}.yaml"
    return TrainingRun(config_path, cfg, run_dir, config_text, config_file)


def _bash_array(name: str, values: list[Path]) -> list[str]:
    return [f"{name}=(", *(f"    {shlex.quote(str(value))}" for value in values), ")"]


def _select_run(runs: list[TrainingRun], *, array: bool) -> list[str]:
    """Bash lines defining RUN_DIR, CONFIG and JOB (the id squeue shows): the job's, or those
    of the array task SLURM_ARRAY_TASK_ID."""
    if not array:
        return [
            f"RUN_DIR={shlex.quote(str(runs[0].run_dir))}",
            f"CONFIG={shlex.quote(str(runs[0].config_file))}",
            "JOB=$SLURM_JOB_ID",
        ]
    last = len(runs) - 1
    return [
        "# Array task i trains config i in its own run directory.",
        *_bash_array("RUN_DIRS", [run.run_dir for run in runs]),
        *_bash_array("CONFIGS", [run.config_file for run in runs]),
        'TASK=${SLURM_ARRAY_TASK_ID:?"not set: this script is a job array, for sbatch"}',
        f'RUN_DIR=${{RUN_DIRS[TASK]:?"array task $TASK has no run (tasks 0-{last})"}}',
        "CONFIG=${CONFIGS[TASK]}",
        "JOB=${SLURM_ARRAY_JOB_ID}_$TASK  # SLURM_JOB_ID is another id, the task's own",
    ]


def _train_script(
    runs: list[TrainingRun],
    *,
    array: bool,
    job_name: str,
    output: str,
    workdir: Path,
    python: str,
) -> str:
    slurm = runs[0].cfg.slurm
    tasks = tasks_per_node(slurm)
    header = _header(
        slurm,
        job_name=job_name,
        nodes=slurm.nodes,
        tasks=tasks,
        gpus=slurm.gpus_per_node,
        time=slurm.time,
        workdir=workdir,
        output=output,
        array_size=len(runs) if array else None,
    )
    header.append(_sbatch_line(f"--signal=B:USR1@{slurm.signal_lead_s}"))
    header += [_sbatch_line(_sbatch_option(line)) for line in slurm.extra_sbatch]
    srun = [
        "srun",
        f"--ntasks-per-node={tasks}",
        f"--cpus-per-task={slurm.cpus_per_task}",
        '"--output=$RUN_DIR/logs/rank-%t.log"',
        "--open-mode=append",
        shlex.quote(python),
        "-m",
        "launch.train",
        '"$CONFIG"',
    ]
    what = f"job array of {len(runs)} runs" if array else f"job for {runs[0].run_dir}"
    lines = [
        "#!/bin/bash",
        f"# rotalibi training {what}: rendered by `python -m launch.slurm`.",
        *header,
        "",
        *_select_run(runs, array=array),
        f"TRAIN=({' '.join(srun)})",
        "",
        # After the signal traps: a stop signal during slow setup lines is not lost.
        JOB_BODY.read_text().rstrip().replace("\n@SETUP@\n", _setup_block(slurm)),
    ]
    return "\n".join(lines) + "\n"


def render_train_script(run: TrainingRun, *, workdir: Path, python: str = sys.executable) -> str:
    """The batch script of a training job that trains `run`."""
    return _train_script(
        [run],
        array=False,
        job_name=run.cfg.slurm.job_name or run.cfg.run.name,
        output=batch_log(run.cfg, run.run_dir),
        workdir=workdir,
        python=python,
    )


def array_parent(runs: list[TrainingRun]) -> Path:
    """The run directories' common parent: it keeps the array's batch logs and names it."""
    return Path(os.path.commonpath([run.run_dir.parent for run in runs]))


def array_batch_log(runs: list[TrainingRun]) -> str:
    return runs[0].cfg.slurm.output or str(array_parent(runs) / "logs" / "array-%A_%a.out")


def render_array_script(
    runs: list[TrainingRun], *, workdir: Path, python: str = sys.executable
) -> str:
    """The batch script of a job array whose task i trains `runs[i]`, as render_train_script's
    job would (check_array first: one slurm section for all)."""
    return _train_script(
        runs,
        array=True,
        job_name=runs[0].cfg.slurm.job_name or array_parent(runs).name,
        output=array_batch_log(runs),
        workdir=workdir,
        python=python,
    )


def check_array(runs: list[TrainingRun]) -> None:
    """The configs of an array run as one job: one slurm section, and each its own run."""
    first = runs[0].cfg.slurm
    differing = [
        f.name
        for f in fields(SlurmConfig)
        if any(getattr(run.cfg.slurm, f.name) != getattr(first, f.name) for run in runs)
    ]
    if differing:
        details = [
            f"'slurm.{key}': "
            + ", ".join(f"{run.source} {getattr(run.cfg.slurm, key)!r}" for run in runs)
            for key in differing
        ]
        raise SlurmError(
            "the configs of a job array run as one job, so their slurm sections must be equal; "
            "they differ in\n  - "
            + "\n  - ".join(details)
            + "\nput the slurm section in a base file they share, or give the key as an override "
            f"(it applies to every config), e.g. slurm.{differing[0]}=..."
        )
    seen: dict[Path, Path] = {}
    for run in runs:
        if run.run_dir in seen:
            raise SlurmError(
                f"{seen[run.run_dir]} and {run.source} both train {run.run_dir} (run.dir/"
                "run.name): their tasks would overwrite each other's checkpoints; give each "
                "config its own run.name"
            )
        seen[run.run_dir] = run.source


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
    header += [_sbatch_line(_sbatch_option(line)) for line in slurm.extra_sbatch]
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


def _array_task_ids(job: str) -> list[str]:
    """squeue shows an array's tasks that have not started as one line, e.g. "12_[0-5,7:2%4]"
    (ranges, steps, a limit on running tasks): the ids of those tasks ("12_0", ...)."""
    match = re.fullmatch(r"(\d+)_\[([^\]%]+)(?:%\d+)?\]", job)
    if match is None:
        return [job]
    array, spec = match.groups()
    ids = []
    for part in spec.split(","):
        first, _, rest = part.partition("-")
        last, _, step = rest.partition(":")
        tasks = range(int(first), int(last or first) + 1, int(step or 1))
        ids += [f"{array}_{task}" for task in tasks]
    return ids


def job_states() -> dict[str, str]:
    """State of every job (and array task, as "<array id>_<task>") the controller still knows
    (finished ones for MinJobAge)."""
    out = _run(["squeue", "--noheader", "--states=all", "--format=%i|%T"])
    pairs = [line.split("|", 1) for line in out.splitlines() if "|" in line]
    return {task: state for job, state in pairs for task in _array_task_ids(job)}


def _jobs_file(run_dir: Path) -> Path:
    return run_dir / "slurm" / "jobs.jsonl"


def _read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines file, less a last line that a killed writer cut short."""
    records = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


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


def sbatch(script: str) -> str:
    """Submit `script`; its job id (of a job array, the array's)."""
    return _run(["sbatch", "--parsable"], stdin=script).strip().split(";")[0]


def record_job(run_dir: Path, job: str, script: str, *, kind: str, detail: dict) -> None:
    """Keep the job's script and a record of it (for --status) under run_dir/slurm."""
    (run_dir / "slurm" / f"job-{job}.sh").write_text(script)
    record = {
        "job": job,
        "kind": kind,
        "submitted": datetime.now().isoformat(timespec="seconds"),
        "script": f"slurm/job-{job}.sh",
        **detail,
    }
    with _jobs_file(run_dir).open("a") as f:
        f.write(json.dumps(record) + "\n")


def _prepare_dirs(run_dir: Path, output: str) -> None:
    """sbatch does not create the log's directory (the job would fail silently)."""
    for directory in (run_dir / "logs", run_dir / "slurm", Path(output).parent):
        if "%" not in str(directory):
            directory.mkdir(parents=True, exist_ok=True)


# ---------------------------------------------------------------- the commands


def submit_training(
    config_paths: list[Path], overrides: list[str], *, dry_run: bool, array: bool = False
) -> int:
    """Submit a config as a training job, or several as a job array whose task i trains
    config i; the overrides apply to every config. Every check runs before anything is
    written or submitted."""
    workdir = Path.cwd()
    runs = [training_run(path, overrides, workdir) for path in config_paths]
    if array:
        check_array(runs)
    slurm = runs[0].cfg.slurm
    check_slurm(slurm)
    check_script_paths(working_directory=workdir)
    for run in runs:
        check_script_paths(run_directory=run.run_dir)
        ranks = run.cfg.slurm.nodes * tasks_per_node(run.cfg.slurm)
        if problems := sequence_parallel_problems(run.cfg, ranks):
            raise SlurmError(f"{run.source}: {problems[0]} (slurm.nodes x tasks per node)")
    if array:
        script, output = render_array_script(runs, workdir=workdir), array_batch_log(runs)
    else:
        script = render_train_script(runs[0], workdir=workdir)
        output = batch_log(runs[0].cfg, runs[0].run_dir)
    if dry_run:
        print(script, end="")
        return 0
    _slurm_command("sbatch")  # before anything is written
    check_partition(slurm.partition)
    for run in runs:
        check_trainable(run.cfg)
        _refuse_second_training_job(run.run_dir)
    for run in runs:
        _prepare_dirs(run.run_dir, output)
        run.config_file.write_text(run.config_text)
    job = sbatch(script)
    ids = [f"{job}_{task}" for task in range(len(runs))] if array else [job]
    for run, run_job in zip(runs, ids, strict=True):
        config = str(run.config_file.relative_to(run.run_dir))
        detail = {"config": config, "source": str(run.source)}
        record_job(run.run_dir, run_job, script, kind="train", detail=detail)
    if array:
        print(f"submitted training job array {job} of {len(runs)} tasks; batch logs {output}")
        for run, run_job in zip(runs, ids, strict=True):
            print(f"  task {run_job}: {run.source}, run directory {run.run_dir}")
        print("progress: python -m launch.slurm --status RUN_DIRECTORY")
    else:
        print(f"submitted training job {job}; run directory {runs[0].run_dir}")
        print(f"progress: python -m launch.slurm --status {runs[0].run_dir}")
    return 0


def check_trainable(cfg: Config) -> None:
    """What launch.train checks first (dataset, a run directory of another model), checked now:
    a job would otherwise wait in the queue only to stop at once."""
    from data.manifest import DatasetError
    from training.resume import check_dataset, resume_point
    from training.rundir import RunDirError

    try:
        check_dataset(cfg)
        resume_point(cfg, cfg.slurm.nodes * tasks_per_node(cfg.slurm))
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
    evaluation_overrides = [o for o in overrides if not o.startswith("slurm.")]
    check_evaluation_overrides(evaluation_overrides)  # a wrong key fails here, not queued
    cfg = load_config(run_dir / "config.yaml", overrides)
    check_slurm(cfg.slurm)
    check_script_paths(working_directory=workdir, evaluation_target=target)
    arguments = evaluation_overrides + options
    check_script_arguments("launch.evaluate's argument", arguments)
    script = render_eval_script(
        cfg, target=target, run_dir=run_dir, arguments=arguments, workdir=workdir
    )
    if dry_run:
        print(script, end="")
        return 0
    _slurm_command("sbatch")
    check_partition(cfg.slurm.partition)
    _prepare_dirs(run_dir, str(run_dir / "logs" / "eval"))
    job = sbatch(script)
    detail = {"target": str(target), "arguments": arguments}
    record_job(run_dir, job, script, kind="eval", detail=detail)
    print(f"submitted evaluation job {job} for {target}; run directory {run_dir}")
    return 0


def _last_step(run_dir: Path) -> int | None:
    records = _read_jsonl(run_dir / "metrics.jsonl")
    return records[-1]["step"] if records else None


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
    parser.add_argument(
        "args", nargs="*", help="CONFIG.yaml (with --array: one or more) then key=value overrides"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the job script only")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--eval", metavar="RUN_DIR_OR_CHECKPOINT", type=Path)
    what.add_argument("--status", metavar="RUN_DIR", type=Path)
    what.add_argument("--array", action="store_true", help="submit the configs as one job array")
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
        configs = [Path(a) for a in args.args if "=" not in a]
        overrides = [a for a in args.args if "=" in a]
        if args.array:
            if not configs:
                parser.error("--array needs configs, e.g. --array configs/study_gpu/*.yaml")
            return submit_training(configs, overrides, dry_run=args.dry_run, array=True)
        if not args.args:
            parser.error("give a config (e.g. configs/7b.yaml), --eval TARGET or --status RUN_DIR")
        if len(configs) > 1:
            parser.error("several configs: submit them as one job array with --array")
        return submit_training([Path(args.args[0])], args.args[1:], dry_run=args.dry_run)
    except (ConfigError, SlurmError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
