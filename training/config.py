"""The run configuration: OmegaConf structured configs with dataclasses as the schema.

A config is the schema's defaults, then a YAML file from configs/, then `key=value` overrides.
Every wrong key, type or value stops with a `ConfigError` that names the key, the bad value and
what would be valid, before anything runs. `python -m launch.config CONFIG [key=value ...]`
prints the resolved config (launch/config.py).
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from data.config import DataConfig
from model.config import ModelConfig


class ConfigError(ValueError):
    """A config problem, stated with the key, the value and the fix."""


# A config is a few sections of a few keys: what a YAML text may expand to (every alias counted
# as the values it stands for) and how deep it may nest. Checked while the YAML is composed, so
# a few hundred bytes of nested aliases (10^8 values) or 100k brackets stop at once.
MAX_YAML_VALUES = 10_000
MAX_YAML_DEPTH = 32


class YAMLLimitError(yaml.YAMLError):
    """YAML that would expand to too many values or nest too deep (a one-line message)."""


class ConfigLoader(yaml.SafeLoader):
    """YAML without 1.1's sexagesimal numbers: `time: 12:00:00` stays a string, not 43200; and
    within MAX_YAML_VALUES values (aliases expanded) and MAX_YAML_DEPTH levels (YAMLLimitError
    otherwise, as soon as either is passed)."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0
        # id of each composed node: the values it expands to and its depth, aliases expanded.
        self._expanded: dict[int, tuple[int, int]] = {}

    def compose_node(self, parent, index):
        event = self.peek_event()
        where = f"line {event.start_mark.line + 1}"
        alias = isinstance(event, yaml.AliasEvent)
        if alias and event.anchor in self.anchors:
            target = self.anchors[event.anchor]
            if id(target) not in self._expanded:  # still being composed: it holds itself
                raise YAMLLimitError(f"{where}: alias *{event.anchor} refers to a node holding it")
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise YAMLLimitError(f"{where}: nested deeper than {MAX_YAML_DEPTH} levels")
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if not alias:
            children = node.value if isinstance(node, yaml.SequenceNode) else []
            if isinstance(node, yaml.MappingNode):
                children = [child for pair in node.value for child in pair]
            sizes = [self._expanded[id(child)] for child in children]
            self._expanded[id(node)] = (
                1 + sum(values for values, _ in sizes),
                1 + max((depth for _, depth in sizes), default=0),
            )
        values, depth = self._expanded[id(node)]
        if values > MAX_YAML_VALUES:
            raise YAMLLimitError(
                f"{where}: expands to more than {MAX_YAML_VALUES:,} values (aliases counted as "
                "the values they stand for)"
            )
        if self._depth + depth > MAX_YAML_DEPTH:
            raise YAMLLimitError(
                f"{where}: nested deeper than {MAX_YAML_DEPTH} levels (aliases expanded)"
            )
        return node


CLOCK_TIME = re.compile(r"^[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+(?:\.[0-9_]*)?$")
ConfigLoader.yaml_implicit_resolvers = {
    first: list(resolvers) for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
for first in "+-0123456789":  # checked before the int and float resolvers
    ConfigLoader.yaml_implicit_resolvers[first].insert(0, ("tag:yaml.org,2002:str", CLOCK_TIME))


# Every integer of a config fits int64 (what torch, numpy and the checkpoints hold them in);
# lengths fit the int32 positions of the attention kernels, and data.seq_len so that the
# default evaluation lengths (up to 64 x data.seq_len) do too.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_LENGTH = 2**31 - 1
MAX_PEAK_TFLOPS = 1e6  # per device: a thousand times an H100's dense bf16


@dataclass
class RunConfig:
    name: str = "tiny"
    dir: str = "runs"  # the run directory is <dir>/<name>
    seed: int = field(default=0, metadata={"min": 0})


TRACKERS = ("tensorboard", "jsonl", "wandb", "mlflow")
# The package each tracker needs beyond the core dependencies (the `trackers` extra).
TRACKER_PACKAGES = {"wandb": "wandb", "mlflow": "mlflow"}


@dataclass
class ProfileConfig:
    """`torch.profiler` over steps start .. start + steps - 1 (training/profiling.py)."""

    start: int = field(default=1, metadata={"min": 1})
    steps: int = field(default=3, metadata={"min": 1})


@dataclass
class TrainConfig:
    max_steps: int = field(default=300, metadata={"min": 1})
    lr: float = field(default=3e-3, metadata={"min": 0.0})
    min_lr_ratio: float = field(default=0.1, metadata={"min": 0.0, "max": 1.0})
    warmup_steps: int = field(default=30, metadata={"min": 0})
    weight_decay: float = field(default=0.1, metadata={"min": 0.0})
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = field(default=1.0, metadata={"min": 0.0})
    grad_accum: int = field(default=1, metadata={"min": 1})
    # Resuming on another number of ranks keeps data.batch_size x grad_accum x ranks unless
    # this is set (launch.train stops with the grad_accum that keeps it).
    allow_batch_change: bool = False
    checkpoint_every: int = field(default=100, metadata={"min": 1})
    keep_checkpoints: int = field(default=3, metadata={"min": 1})
    # When the run directory holds checkpoints and none verifies (README "Resuming"): false
    # stops (exit 2) naming them; true moves them to RUN/unverified/ and trains from step 0.
    restart_if_unverified: bool = False
    log_every: int = field(default=10, metadata={"min": 1})
    activation_checkpointing: bool = False
    # Bitwise-reproducible GPU steps (README "Determinism"): pinned attention tiles and dq
    # without atomics, at about a third more backward attention work. Off by default: the
    # study's differences are far above the last bits the atomics' order changes.
    deterministic: bool = False
    # Ranks that share one sequence, each holding 1/N of its tokens (DeepSpeed-Ulysses; README
    # "Long contexts"): the world is N x (data-parallel ranks).
    sequence_parallel: int = field(default=1, metadata={"min": 1})
    max_bad_steps: int = field(default=5, metadata={"min": 1})  # non-finite steps in a row
    # Per-device peak TFLOP/s for MFU; None: a known GPU's datasheet, or measured on the CPU.
    peak_tflops: float | None = None
    # Where rank 0's records go (training/metrics.py): any of tensorboard, jsonl, wandb, mlflow.
    loggers: list[str] = field(default_factory=lambda: ["tensorboard", "jsonl"])
    tracker_project: str = "rotalibi"  # the W&B project and MLflow experiment
    profile: ProfileConfig | None = None  # e.g. {start: 10, steps: 3}; None: no profiling


@dataclass
class EvalConfig:
    """Extrapolation evaluation (launch/evaluate.py; README "Evaluation")."""

    # Evaluation lengths in tokens; None means data.seq_len x (1, 2, 4, 8, 16, 32, 64).
    lengths: list[int] | None = None
    # Held-out windows of the longest length; shorter lengths cut the same text into more.
    windows: int = field(default=2, metadata={"min": 1})
    every_checkpoint: bool = True
    # Draws the windows and the passkeys: keep it fixed so that runs compare.
    seed: int = field(default=0, metadata={"min": 0})
    batch_tokens: int = field(default=8192, metadata={"min": 1})  # tokens per forward pass
    # Attention diagnostics (on the text of the first `diagnostic_windows` windows) and passkey
    # retrieval run at these lengths; None means the evaluation lengths up to 16 x data.seq_len.
    diagnostic_lengths: list[int] | None = None
    diagnostic_windows: int = field(default=1, metadata={"min": 1})
    mixing_eps: list[float] = field(default_factory=lambda: [0.1, 0.01])
    passkey_lengths: list[int] | None = None
    passkey_depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    passkey_trials: int = field(default=2, metadata={"min": 1})
    # A length runs only if its estimated memory fits this share of the free memory.
    memory_fraction: float = field(default=0.8, metadata={"min": 0.01, "max": 1.0})
    # Positions per chunk of the evaluation's forward (model/chunked.py): it holds the residual
    # stream and one layer's keys and values, plus O(chunk); null: the plain forward.
    chunk: int | None = field(default=1024, metadata={"min": 1})

    def __post_init__(self):
        problems = []
        if not all(0 < eps < 1 for eps in self.mixing_eps) or not self.mixing_eps:
            problems.append(f"'eval.mixing_eps' is {self.mixing_eps}; give numbers in (0, 1)")
        if not self.passkey_depths or not all(0 <= d <= 1 for d in self.passkey_depths):
            problems.append(
                f"'eval.passkey_depths' is {self.passkey_depths}; give numbers in [0, 1]"
            )
        for key in ("diagnostic_lengths", "passkey_lengths"):
            value = getattr(self, key)
            if value is not None and any(not 2 <= n <= MAX_LENGTH for n in value):
                problems.append(
                    f"'eval.{key}' is {value}; every length must be in [2, {MAX_LENGTH}]"
                )
        if problems:
            raise ConfigError(_invalid(problems))


@dataclass
class DeepSpeedConfig:
    zero_stage: int = field(default=3, metadata={"choices": [1, 2, 3]})
    # "auto": bf16 on GPU, fp32 on CPU.
    precision: str = field(default="auto", metadata={"choices": ["auto", "fp32", "bf16", "fp16"]})
    offload_optimizer: bool = False
    offload_params: bool = False
    # Build the model under deepspeed.zero.Init (each rank holds only its partition from the
    # start); None: on for zero_stage 3 with more than one rank.
    zero_init: bool | None = None
    reduce_bucket_size: int = field(default=500_000_000, metadata={"min": 1})
    prefetch_bucket_size: int = field(default=50_000_000, metadata={"min": 1})


@dataclass
class SlurmConfig:
    nodes: int = field(default=1, metadata={"min": 1})
    gpus_per_node: int = field(default=8, metadata={"min": 0})
    # Tasks (ranks) per node: one per GPU; set it only for CPU nodes (gpus_per_node=0; default 1).
    tasks_per_node: int | None = field(default=None, metadata={"min": 1})
    cpus_per_task: int = field(default=8, metadata={"min": 1})
    mem: str | None = None
    time: str = "24:00:00"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    job_name: str | None = None  # default: run.name
    output: str | None = None  # batch log (sbatch --output); default <run_dir>/logs/slurm-%j.out
    extra_sbatch: list[str] = field(default_factory=list)  # raw "#SBATCH ..." options
    setup: list[str] = field(default_factory=list)  # shell lines before srun (modules, venv)
    env: dict[str, str] = field(default_factory=dict)  # NCCL and network knobs
    # USR1 this long before the end (sbatch --signal takes at most 65535 s).
    signal_lead_s: int = field(default=300, metadata={"min": 1, "max": 65535})
    eval_time: str = "04:00:00"  # time limit of `launch.slurm --eval` jobs


def tasks_per_node(slurm: SlurmConfig) -> int:
    """One task per GPU; on CPU nodes `slurm.tasks_per_node` (default 1)."""
    if slurm.tasks_per_node is not None:
        return slurm.tasks_per_node
    return max(slurm.gpus_per_node, 1)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)

    @property
    def eval_lengths(self) -> list[int]:
        if self.eval.lengths is not None:
            return list(self.eval.lengths)
        return [self.data.seq_len * m for m in (1, 2, 4, 8, 16, 32, 64)]

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir) / self.run.name


def _schema_keys(schema: type, prefix: str = "") -> list[str]:
    keys = []
    for f in fields(schema):
        key = prefix + f.name
        keys.append(key)
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        if is_dataclass(default):
            keys += _schema_keys(type(default), key + ".")
    return keys


def _unknown_key(key: str) -> ConfigError:
    parent = key.rpartition(".")[0]
    siblings = [k for k in _schema_keys(Config) if k.rpartition(".")[0] == parent]
    close = difflib.get_close_matches(key, siblings, n=1, cutoff=0.6)
    hint = f"did you mean '{close[0]}'? " if close else ""
    scope = f" of '{parent}'" if parent else ""
    return ConfigError(
        f"unknown config key '{key}'; {hint}valid keys{scope}: {', '.join(siblings)}"
    )


def _merge(base: DictConfig, layer: DictConfig, origin: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, layer)
    except ConfigKeyError as e:
        raise _unknown_key(e.full_key) from None
    except ValidationError as e:
        if not e.full_key:  # a section given a plain value, e.g. train=5
            section = next(iter(layer), "?")
            raise ConfigError(
                f"{origin}: '{section}' is a section; set its keys ({section}.KEY=VALUE)"
            ) from None
        value = OmegaConf.select(layer, e.full_key.split("[")[0], default="?")
        raise ConfigError(
            f"{origin}: bad value for '{e.full_key}': {str(e.msg).splitlines()[0]} (got {value!r})"
        ) from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"{origin}: {str(e).splitlines()[0]}") from None


def _numbers(value: Any, kind: type) -> list:
    """The numbers of type `kind` in a value (itself, or inside a list, dict or stream
    section); bools are not integers here."""
    if isinstance(value, kind) and not isinstance(value, bool):
        return [value]
    if is_dataclass(value):
        value = [getattr(value, f.name) for f in fields(value)]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        return [x for item in value for x in _numbers(item, kind)]
    return []


def _invalid(problems: list[str]) -> str:
    """One problem in one line; several, one a line."""
    if len(problems) == 1:
        return f"invalid config: {problems[0]}"
    return "invalid config:\n  - " + "\n  - ".join(problems)


def _check_values(obj: Any, prefix: str = "") -> list[str]:
    """Problems with `choices`, `min` and `max` metadata of the schema's fields, any
    non-finite float (NaN passes every comparison) and any integer beyond int64."""
    problems = []
    for f in fields(obj):
        value, key, meta = getattr(obj, f.name), prefix + f.name, f.metadata
        if is_dataclass(value):
            problems += _check_values(value, key + ".")
        elif not all(math.isfinite(x) for x in _numbers(value, float)):
            problems.append(f"'{key}' is {value!r}; give finite numbers (no .nan or .inf)")
        elif value is None:
            continue
        elif "choices" in meta and value not in meta["choices"]:
            choices = ", ".join(map(str, meta["choices"]))
            problems.append(f"'{key}' is {value!r}; valid choices: {choices}")
        elif "min" in meta and value < meta["min"]:
            problems.append(f"'{key}' is {value!r}; it must be >= {meta['min']}")
        elif "max" in meta and value > meta["max"]:
            problems.append(f"'{key}' is {value!r}; it must be <= {meta['max']}")
        elif not all(INT64_MIN <= x <= INT64_MAX for x in _numbers(value, int)):
            problems.append(
                f"'{key}' is {value!r}; integers must be in [{INT64_MIN}, {INT64_MAX}] (int64)"
            )
    return problems


EVALUATION_OVERRIDABLE = ("eval.", "data.path=", "model.attn_block=", "deepspeed.precision=")


def check_evaluation_overrides(overrides: list[str]) -> None:
    """An evaluation changes how it measures, never the model a checkpoint holds."""
    bad = [o for o in overrides if not o.startswith(EVALUATION_OVERRIDABLE)]
    if bad:
        raise ConfigError(
            f"cannot override {', '.join(bad)} at evaluation: only eval.*, data.path, "
            "model.attn_block and deepspeed.precision change; the rest is the checkpoint's"
        )


RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*")
RUN_NAME_RULE = (
    "letters, digits and . _ - (not first in a part), '/' between parts: a path inside "
    "run.dir (not empty, absolute or with '..')"
)


def run_name_problem(name: str) -> str | None:
    """Why `name` cannot be a run.name (it names a directory under run.dir and a SLURM job)."""
    if RUN_NAME.fullmatch(name):
        return None
    return f"'run.name' is {name!r}; use {RUN_NAME_RULE}"


def sequence_parallel_problems(cfg: Config, world_size: int | None = None) -> list[str]:
    """Why train.sequence_parallel does not fit the model, the length or `world_size` ranks."""
    n, problems = cfg.train.sequence_parallel, []
    if n == 1:
        return problems
    for what, count in (
        ("data.seq_len", cfg.data.seq_len),
        ("model.n_heads", cfg.model.n_heads),
        ("model.n_kv_heads", cfg.model.kv_heads),
    ):
        if count % n:
            problems.append(
                f"train.sequence_parallel={n} does not divide {what}={count}: each rank of a "
                "group takes 1/N of the tokens, then 1/N of the heads"
            )
    if world_size is not None and world_size % n:
        problems.append(
            f"train.sequence_parallel={n} does not divide the {world_size} rank(s) of this job"
        )
    return problems


def validate(cfg: Config) -> Config:
    """Raise ConfigError listing every problem of a merged config."""
    problems = _check_values(cfg)
    if problems:  # the checks across fields divide by some (n_heads 0 would raise)
        raise ConfigError(_invalid(problems))
    problems = cfg.model.check()
    if (problem := run_name_problem(cfg.run.name)) is not None:
        problems.append(problem)
    if cfg.eval.lengths is not None and (
        not cfg.eval.lengths or any(not 2 <= n <= MAX_LENGTH for n in cfg.eval.lengths)
    ):
        problems.append(
            f"'eval.lengths' is {cfg.eval.lengths}; give lengths in [2, {MAX_LENGTH}] (null: "
            "the default ones)"
        )
    if len(cfg.train.betas) != 2 or not all(0 <= b < 1 for b in cfg.train.betas):
        problems.append(f"'train.betas' is {cfg.train.betas}; give two numbers in [0, 1)")
    problems += sequence_parallel_problems(cfg)
    if cfg.train.peak_tflops is not None and not 0 < cfg.train.peak_tflops <= MAX_PEAK_TFLOPS:
        problems.append(
            f"'train.peak_tflops' is {cfg.train.peak_tflops}; give the device's peak TFLOP/s "
            f"(> 0, at most {MAX_PEAK_TFLOPS:g}), or null to look it up or measure it"
        )
    problems += tracker_problems(cfg.train)
    if problems:
        raise ConfigError(_invalid(problems))
    return cfg


def tracker_problems(train: TrainConfig) -> list[str]:
    """Unknown or repeated train.loggers, a tracker whose package is not installed, and a
    train.profile that ends after train.max_steps."""
    import importlib.util

    loggers, problems = train.loggers, []
    unknown = [name for name in loggers if name not in TRACKERS]
    if unknown or len(set(loggers)) != len(loggers):
        problems.append(
            f"'train.loggers' is {loggers}; give each of {', '.join(TRACKERS)} at most once"
        )
    for name in set(loggers) & set(TRACKER_PACKAGES):
        if importlib.util.find_spec(TRACKER_PACKAGES[name]) is None:
            problems.append(
                f"'train.loggers' names {name}, which is not installed: "
                f"pip install -e '.[trackers]' (or pip install {TRACKER_PACKAGES[name]})"
            )
    profile = train.profile
    if profile is not None and profile.start + profile.steps - 1 > train.max_steps:
        problems.append(
            f"'train.profile' covers steps {profile.start}..{profile.start + profile.steps - 1}, "
            f"past train.max_steps={train.max_steps}"
        )
    return problems


def file_layers(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[DictConfig, str]]:
    """The YAML file's settings, after those of the file its `base:` names (relative to it)."""
    if not path.is_file():
        available = ", ".join(sorted(str(p) for p in Path("configs").glob("**/*.yaml")))
        raise ConfigError(f"config file {path} not found; available: {available or 'none'}")
    if path.resolve() in seen:
        chain = " -> ".join(str(p) for p in (*seen, path.resolve()))
        raise ConfigError(f"config files name each other as base: {chain}")
    try:
        raw = yaml.load(path.read_text(), Loader=ConfigLoader) or {}
    except YAMLLimitError as e:
        raise ConfigError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {_yaml_problem(e)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{path} holds a {type(raw).__name__}, not a mapping of sections (run:, model:, ...)"
        )
    raw = _plain_values(raw, str(path))
    base = raw.pop("base", None)
    if base is not None and not isinstance(base, str):
        raise ConfigError(f"{path}: 'base' is {base!r}; give one YAML file's path, relative to it")
    layers = [] if base is None else file_layers(path.parent / base, (*seen, path.resolve()))
    return [*layers, (OmegaConf.create(raw), str(path))]


SHELL_LINES = ("slurm", "setup")  # their ${...} are the shell's, written as they are


def _plain_values(value: Any, origin: str, path: tuple[str, ...] = ()) -> Any:
    """`value` (at config key `path`) for OmegaConf, which would resolve `${...}` (environment
    variables, other keys, resolvers): a config says what it means in plain values, so an
    interpolation is refused; in slurm.setup's shell lines `${...}` is the shell's, escaped
    for OmegaConf to keep as written."""
    if isinstance(value, dict):
        return {k: _plain_values(v, origin, (*path, str(k))) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain_values(item, origin, path) for item in value]
    if isinstance(value, str) and "${" in value:
        if path[: len(SHELL_LINES)] == SHELL_LINES:
            # OmegaConf reads 2k+1 backslashes before `${` as k backslashes and a literal
            # `${`: each run of backslashes before `${` is doubled, plus one.
            return re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", value)
        raise ConfigError(
            f"{origin}: {value!r} is an interpolation (${{...}}), which configs do not take; "
            "write the value itself (only slurm.setup's shell lines keep ${...}, for the shell)"
        )
    return value


def _yaml_problem(error: yaml.YAMLError) -> str:
    """A YAML error in one line: what is wrong, and where."""
    problem = getattr(error, "problem", None)
    mark = getattr(error, "problem_mark", None)
    if problem is None:
        return " ".join(str(error).split())
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark else problem


def _short(item: str, limit: int = 80) -> str:
    """An override as an error message quotes it: its start, if it is long."""
    return repr(item) if len(item) <= limit else f"{item[:limit]!r}... ({len(item):,} characters)"


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Schema defaults <- YAML file (after its `base:` file, if it names one) <- `key=value`
    overrides, validated."""
    merged = OmegaConf.structured(Config)
    for layer, origin in file_layers(Path(path)) if path is not None else []:
        merged = _merge(merged, layer, origin)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"override {item!r} is not of the form key=value (e.g. model.scheme=rope)"
            )
        key, _, text = item.partition("=")
        try:
            value = yaml.load(text, Loader=ConfigLoader)
        except YAMLLimitError as e:
            raise ConfigError(f"override {_short(item)}: {e}") from None
        except yaml.YAMLError as e:
            raise ConfigError(
                f"override {_short(item)}: the value is not valid YAML "
                f"({getattr(e, 'problem', e)}); e.g. eval.lengths=[128,256]"
            ) from None
        value = _plain_values(value, f"override {item!r}", tuple(key.strip().split(".")))
        layer = OmegaConf.create()
        OmegaConf.update(layer, key.strip(), value, merge=True)
        merged = _merge(merged, layer, f"override {item!r}")
    return validate(OmegaConf.to_object(merged))


def to_yaml(cfg: Config) -> str:
    """OmegaConf.to_yaml's text of `cfg`, dumped from the dataclasses: OmegaConf would read a
    slurm.setup line's `${...}` (the shell's) as its own interpolation."""
    from omegaconf._utils import get_omega_conf_dumper

    return yaml.dump(
        asdict(cfg),
        default_flow_style=False,
        allow_unicode=True,
        sort_keys=False,
        Dumper=get_omega_conf_dumper(),
    )
