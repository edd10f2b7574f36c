"""Configs: every shipped YAML loads; wrong keys, types and values fail clearly, up front."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from launch.config import main
from model import Transformer
from training.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.model.scheme == "hybrid"
    assert cfg.model.d_model % cfg.model.n_heads == 0


def test_tiny_is_the_cpu_default_and_builds():
    cfg = load_config(TINY)
    assert (cfg.model.n_layers, cfg.model.d_model, cfg.model.n_heads, cfg.data.seq_len) == (
        2,
        128,
        4,
        128,
    )
    assert cfg.eval_lengths == [128 * m for m in (1, 2, 4, 8, 16, 32, 64)]
    model = Transformer(cfg.model, train_length=cfg.data.seq_len)
    assert sum(p.numel() for p in model.parameters()) > 100_000


def test_overrides_apply_with_types():
    cfg = load_config(TINY, ["model.scheme=rope", "train.lr=1e-4", "eval.lengths=[128,256]"])
    assert (cfg.model.scheme, cfg.train.lr, cfg.eval_lengths) == ("rope", 1e-4, [128, 256])


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("model.schem=rope", ["model.schem", "did you mean 'model.scheme'"]),
        ("modle.scheme=rope", ["'modle'", "did you mean 'model'"]),
        ("model.scheme=ropee", ["model.scheme", "'ropee'", "hybrid", "path_alibi"]),
        ("model.n_layers=two", ["model.n_layers", "'two'", "Integer"]),
        ("train.lr=-1", ["train.lr", "-1.0", ">= 0.0"]),
        ("data.seq_len=1", ["data.seq_len", ">= 2"]),
        ("data.packing=tight", ["data.packing", "'tight'", "boundaries, concat"]),
        ("model.n_heads=3", ["model.d_model=128", "model.n_heads=3"]),
        ("model.n_kv_heads=3", ["model.n_kv_heads=3", "multiple"]),
        ("eval.lengths=[128,x]", ["eval.lengths[1]", "'x'"]),
        ("deepspeed.zero_stage=4", ["deepspeed.zero_stage", "1, 2, 3"]),
        ("run.seed", ["key=value"]),
        ("eval.lengths=[128,", ["eval.lengths=[128,", "not valid YAML"]),
        ("train.peak_tflops=0", ["train.peak_tflops", "> 0"]),
        ("eval.seed=-1", ["eval.seed", ">= 0"]),
        ("eval.passkey_depths=[]", ["eval.passkey_depths", "[0, 1]"]),
        ("eval.lengths=[]", ["eval.lengths", "null: the default ones"]),
        ("train.lr=.nan", ["'train.lr' is nan", "finite"]),
        ("train.lr=.inf", ["'train.lr' is inf", "finite"]),
        ("train.peak_tflops=-.inf", ["'train.peak_tflops' is -inf", "finite"]),
        ("data.streams=[{path: a, proportion: .nan}]", ["'data.streams'", "finite"]),
        ("train=5", ["'train' is a section", "train.KEY=VALUE"]),
        ("run.name=''", ["'run.name' is ''", "not empty"]),
        ("run.name=/etc/x", ["'run.name' is '/etc/x'", "absolute"]),
        ("run.name=../../outside", ["'run.name' is '../../outside'", "'..'"]),
        ("run.name=a/../../b", ["'run.name' is 'a/../../b'"]),
        ("run.name=${oc.env:HOME}", ["interpolation", "write the value itself"]),
    ],
)
def test_bad_key_or_value_names_key_value_and_choices(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, [override])
    for fragment in expected:
        assert fragment in str(err.value)


def test_missing_or_broken_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("model:\n  heads: 4\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'model\.heads'.*model\.n_heads"):
        load_config(unknown)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("- 1\n- 2\n", "holds a list, not a mapping of sections"),
        ("base: [1]\n", "'base' is [1]; give one YAML file's path"),
        ("run:\n  name: ${oc.env:HOME}\n", "interpolation"),
        ("train:\n  lr: .nan\n", "'train.lr' is nan"),
    ],
)
def test_malformed_config_files_are_one_line_errors(tmp_path, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_config(path)


def test_cli_prints_resolved_config_or_error(capsys):
    assert main([str(TINY), "model.scheme=alibi"]) == 0
    assert "scheme: alibi" in capsys.readouterr().out
    assert main([str(TINY), "model.scheme=nonsense"]) == 2
    assert "valid choices" in capsys.readouterr().err


def test_clock_times_stay_strings_in_files_and_overrides(tmp_path):
    """YAML 1.1 reads 12:00:00 as the sexagesimal integer 43200; configs must not."""
    config = tmp_path / "times.yaml"
    config.write_text("slurm:\n  time: 12:00:00\n  eval_time: 10:00\n")
    cfg = load_config(config, ["slurm.partition=01:02"])
    assert (cfg.slurm.time, cfg.slurm.eval_time, cfg.slurm.partition) == (
        "12:00:00",
        "10:00",
        "01:02",
    )
    assert load_config(config, ["slurm.time=1-00:30:00"]).slurm.time == "1-00:30:00"


def test_a_config_builds_on_its_base(tmp_path):
    (tmp_path / "study").mkdir()
    (tmp_path / "base.yaml").write_text(
        f"base: {TINY}\nrun:\n  dir: runs/study\ntrain:\n  lr: 1.0e-3\n"
    )
    (tmp_path / "study" / "rope.yaml").write_text("base: ../base.yaml\nmodel:\n  scheme: rope\n")
    cfg = load_config(tmp_path / "study" / "rope.yaml", ["train.max_steps=7"])
    assert (cfg.model.scheme, cfg.run.dir, cfg.train.lr) == ("rope", "runs/study", 1e-3)
    assert (cfg.model.d_model, cfg.train.max_steps) == (128, 7)  # from tiny.yaml, overrides
    (tmp_path / "base.yaml").write_text("base: study/rope.yaml\n")
    with pytest.raises(ConfigError, match="name each other as base"):
        load_config(tmp_path / "study" / "rope.yaml")
    (tmp_path / "study" / "rope.yaml").write_text("base: ../nowhere.yaml\n")
    with pytest.raises(ConfigError, match=r"nowhere\.yaml not found"):
        load_config(tmp_path / "study" / "rope.yaml")


def _run(module: str, *args: object) -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS...` from the repository root (killed if it outlives the test)."""
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=150,
    )


def _nested_aliases(levels: int = 8, fanout: int = 10) -> str:
    """A few hundred bytes of YAML whose last alias stands for fanout**levels numbers."""
    lines = ["anchors:", "  a0: &a0 [" + ", ".join(["128"] * fanout) + "]"]
    for i in range(1, levels + 1):
        lines.append(f"  a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * fanout) + "]")
    return "\n".join(lines) + f"\neval:\n  lengths: *a{levels}\n"


def _nested_mappings(depth: int) -> str:
    return "eval: " + "{a: " * depth + "1" + "}" * depth + "\n"


@pytest.mark.timeout(200)
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (_nested_aliases(), "expands to more than"),
        ("eval:\n  lengths: " + "[" * 100_000 + "]" * 100_000 + "\n", "nested deeper than"),
        (_nested_mappings(5_000), "nested deeper than"),
    ],
    ids=["nested aliases", "list 100k deep", "mapping 5k deep"],
)
def test_yaml_that_expands_or_nests_too_far_is_a_one_line_error(tmp_path, text, expected):
    """A few hundred bytes of aliases would expand to 10^8 values (minutes, gigabytes), and deep
    nesting would end in RecursionError: both stop while the YAML is read."""
    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    done = _run("launch.config", path)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}:"), done.stderr[-2000:]
    assert expected in lines[0]


@pytest.mark.timeout(120)
def test_yaml_limits_hold_for_overrides_and_leave_real_configs_alone(tmp_path):
    chain = "[" + ", ".join(f"&a{i} [*a{i - 1}]" for i in range(1, 40)) + ", *a39]"
    for value, expected in [
        ("[" * 50_000 + "]" * 50_000, "nested deeper than 32 levels"),
        ("{a: " * 5_000 + "1" + "}" * 5_000, "nested deeper than 32 levels"),
        (f"[&a0 [128], {chain[1:]}", "nested deeper than 32 levels (aliases expanded)"),
        ("&x [128, *x]", "alias *x refers to a node holding it"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(expected)) as err:
            load_config(TINY, [f"eval.lengths={value}"])
        assert "\n" not in str(err.value) and len(str(err.value)) < 300
    # Anchors and aliases as configs use them, and a long list, still load.
    config = tmp_path / "aliases.yaml"
    config.write_text("eval:\n  lengths: &lengths [64, 128]\n  passkey_lengths: *lengths\n")
    many = list(range(2, 2_002))
    cfg = load_config(config, [f"eval.diagnostic_lengths={many}"])
    assert cfg.eval.lengths == cfg.eval.passkey_lengths == [64, 128]
    assert cfg.eval.diagnostic_lengths == many


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("data.seq_len=99999999999999999999999", "'data.seq_len' is 99999999999999999999999"),
        ("data.seq_len=33554433", "it must be <= 33554432"),
        ("data.batch_size=9223372036854775808", "'data.batch_size' is 9223372036854775808"),
        ("train.max_steps=-9223372036854775809", "'train.max_steps' is -9223372036854775809"),
        ("run.seed=18446744073709551616", "'run.seed' is 18446744073709551616"),
        ("model.random_accrot_seed=-9223372036854775809", "'model.random_accrot_seed'"),
        ("eval.lengths=[128,9223372036854775808]", "'eval.lengths'"),
        ("eval.lengths=[128,4294967296]", "'eval.lengths'"),
        ("eval.passkey_lengths=[99999999999999999999]", "'eval.passkey_lengths'"),
        ("slurm.signal_lead_s=65536", "'slurm.signal_lead_s' is 65536"),
        ("train.peak_tflops=1e300", "'train.peak_tflops' is 1e+300"),
    ],
)
def test_integers_out_of_range_are_one_line_errors(override, expected):
    """Every integer fits int64, and those with a smaller limit (lengths: int32 positions up to
    64 x data.seq_len; Slurm's --signal) stay within it."""
    with pytest.raises(ConfigError) as err:
        load_config(TINY, [override])
    message = str(err.value)
    assert expected in message and "\n" not in message


@pytest.mark.parametrize(
    "override",
    ["model.n_heads=0", "model.n_kv_heads=0", "train.sequence_parallel=0"],
)
def test_a_zero_divisor_is_reported_not_divided_by(override, capsys):
    assert main([str(TINY), override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: invalid config: ") and err.count("\n") == 1
    assert f"'{override.split('=')[0]}' is 0; it must be >= 1" in err


@pytest.mark.timeout(300)
def test_train_refuses_an_integer_too_large_before_creating_the_run(stdlib_dataset, tmp_path):
    runs = tmp_path / "runs"
    done = _run(
        "launch.train",
        TINY,
        f"run.dir={runs}",
        f"data.path={stdlib_dataset}",
        "model.vocab_size=512",
        "data.seq_len=99999999999999999999999",
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip().splitlines() == [
        "error: invalid config: 'data.seq_len' is 99999999999999999999999; it must be <= 33554432"
    ]
    assert not runs.exists()
