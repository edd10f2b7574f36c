"""The training loop's parts on their own: launcher environments, the DeepSpeed config, the LR
schedule, FLOP counting, checkpoint completeness and integrity, and the run directory's lock."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from model import ModelConfig, Transformer
from training import checkpoint as ckpt
from training.config import ConfigError, load_config, to_yaml
from training.distributed import complete_environment, expand_nodelist
from training.engine import deepspeed_config, lr_multiplier, parameter_groups
from training.metrics import MetricsLogger, training_flops_per_token
from training.rundir import (
    LOCK_FILE,
    SAME_JOB_STALE_S,
    STALE_AFTER_S,
    RunDirError,
    RunLock,
    probe_writable,
)

CPU, GPU = torch.device("cpu"), torch.device("cuda", 0)


@pytest.mark.parametrize(("given", "spin_count"), [(None, "0"), ("ACTIVE", "30000000000")])
def test_launch_sets_a_passive_openmp_wait_unless_the_environment_chose(given, spin_count):
    """libgomp as torch loads it under launch.train (its verbose environment display): passive
    (no spinning at the end of parallel regions) by default, the user's policy when set."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["OMP_DISPLAY_ENV"] = "verbose"
    if given:
        env["OMP_WAIT_POLICY"] = given
    done = subprocess.run(
        [sys.executable, "-c", "import launch.train"], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"GOMP_SPINCOUNT = '{spin_count}'" in done.stderr


@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        ("node1", ["node1"]),
        ("gpu[01-03,07]", ["gpu01", "gpu02", "gpu03", "gpu07"]),
        ("a[8-10],login1,b[2]", ["a8", "a9", "a10", "login1", "b2"]),
    ],
)
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


def test_slurm_task_environment_maps_to_torch_distributed():
    env = {
        "SLURM_PROCID": "13",
        "SLURM_LOCALID": "5",
        "SLURM_NTASKS": "16",
        "SLURM_NODEID": "1",
        "SLURM_TASKS_PER_NODE": "8(x2)",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
        "SLURM_JOB_ID": "123456",
    }
    complete_environment(env)
    assert env["RANK"] == "13" and env["LOCAL_RANK"] == "5" and env["WORLD_SIZE"] == "16"
    assert env["LOCAL_WORLD_SIZE"] == "8"
    assert env["MASTER_ADDR"] == "gpu07"
    assert env["MASTER_PORT"] == str(20000 + 123456 % 20000)


def test_launcher_environments_are_completed_not_overridden():
    lone: dict[str, str] = {}
    complete_environment(lone)
    assert (lone["RANK"], lone["WORLD_SIZE"], lone["LOCAL_WORLD_SIZE"]) == ("0", "1", "1")
    assert 0 < int(lone["MASTER_PORT"]) < 65536
    deepspeed_launcher = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_SIZE": "2"}
    deepspeed_launcher |= {"MASTER_ADDR": "h", "MASTER_PORT": "1"}
    complete_environment(deepspeed_launcher)
    assert deepspeed_launcher["LOCAL_WORLD_SIZE"] == "2" and deepspeed_launcher["RANK"] == "3"


def test_deepspeed_config_follows_the_run_config():
    cfg = load_config(
        None,
        [
            "data.batch_size=4",
            "train.grad_accum=3",
            "train.grad_clip=0.5",
            "deepspeed.zero_stage=3",
            "deepspeed.offload_optimizer=true",
        ],
    )
    cpu = deepspeed_config(cfg, world_size=2, device=CPU)
    assert cpu["train_batch_size"] == 4 * 3 * 2
    assert cpu["gradient_accumulation_steps"] == 3 and cpu["gradient_clipping"] == 0.5
    assert cpu["zero_optimization"]["stage"] == 3
    assert cpu["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert not cpu["bf16"]["enabled"] and not cpu["fp16"]["enabled"]
    assert "optimizer" not in cpu  # torch AdamW as a client optimizer on the CPU
    gpu = deepspeed_config(cfg, world_size=8, device=GPU)
    assert gpu["bf16"]["enabled"] and gpu["optimizer"]["type"] == "AdamW"


def test_precision_and_offload_errors_name_the_fix():
    with pytest.raises(ConfigError, match=r"deepspeed\.precision=bf16 needs a GPU.*fp32"):
        deepspeed_config(load_config(None, ["deepspeed.precision=bf16"]), 1, CPU)
    offload = ["deepspeed.zero_stage=2", "deepspeed.offload_params=true"]
    with pytest.raises(ConfigError, match=r"offload_params needs deepspeed\.zero_stage=3"):
        deepspeed_config(load_config(None, offload), 1, CPU)


def test_lr_schedule_is_linear_warmup_then_cosine():
    cfg = load_config(None, ["train.max_steps=110", "train.warmup_steps=10"])
    lo = cfg.train.min_lr_ratio
    assert lr_multiplier(0, cfg) == pytest.approx(0.1)
    assert lr_multiplier(9, cfg) == pytest.approx(1.0)
    assert lr_multiplier(10, cfg) == pytest.approx(1.0)
    assert lr_multiplier(60, cfg) == pytest.approx(lo + (1 - lo) * 0.5)
    assert lr_multiplier(110, cfg) == pytest.approx(lo)
    assert lr_multiplier(500, cfg) == pytest.approx(lo)


def test_weight_decay_only_on_matrices():
    model = Transformer(ModelConfig(scheme="hybrid"), train_length=128)
    decay, no_decay = parameter_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.dim() == 2 for p in decay["params"])
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert "embed.weight" in skipped and any(n.endswith("attn_norm.weight") for n in skipped)
    assert any(n.endswith("position.delta.bias") for n in skipped)
    total = len(decay["params"]) + len(no_decay["params"])
    assert total == len(list(model.parameters()))


def test_training_flops_count_every_linear_map_and_each_attended_key():
    cfg = ModelConfig(vocab_size=100, d_model=32, n_layers=3, n_heads=4)
    model = Transformer(cfg, train_length=64)
    # Brute force: multiply-adds of each linear map, and the keys each query sees.
    linear = sum(
        m.in_features * m.out_features for m in model.modules() if hasattr(m, "in_features")
    )
    for T, window in [(64, None), (64, 16), (10, 16)]:
        keys = sum(min(i + 1, window or T) for i in range(T)) / T
        expected = 6 * linear + 3 * cfg.n_layers * 4 * cfg.d_model * keys
        assert training_flops_per_token(model, T, window) == pytest.approx(expected)


def _fake_checkpoint(root, step: int) -> None:
    """A checkpoint of one rank under ZeRO-3: its layout's files (and weights.pt), a manifest
    with every key."""
    directory = root / ckpt.tag(step)
    directory.mkdir(parents=True)
    contents = {
        "weights.pt": b"x" * (100 + step),
        "trainer_rank_0.pt": b"y" * 10,
        "zero_pp_rank_0_mp_rank_00_model_states.pt": b"m",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt": b"o",
    }
    files = {}
    for name, data in contents.items():
        (directory / name).write_bytes(data)
        files[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest = {
        "step": step,
        "finite": True,
        "files": files,
        "config": to_yaml(load_config(None, [])),
        "tokens": 0,
        "skipped_steps": 0,
        "hooks_owed": False,
        "world_size": 1,
        "tokenizer_sha256": "0" * 64,
    }
    (directory / ckpt.MANIFEST).write_text(json.dumps(manifest))


def test_incomplete_and_truncated_checkpoints_are_skipped_with_a_warning(tmp_path, caplog):
    for step in (10, 20, 30, 40, 50, 60):
        _fake_checkpoint(tmp_path, step)
    (tmp_path / "step_40" / ckpt.MANIFEST).unlink()  # killed before the manifest
    (tmp_path / "step_30" / "weights.pt").write_bytes(b"x" * 7)  # truncated by hand
    (tmp_path / "step_20" / "trainer_rank_0.pt").unlink()  # a file lost
    (tmp_path / "step_50" / ckpt.MANIFEST).write_text("{}")  # valid JSON, not a manifest
    (tmp_path / "step_60" / ckpt.MANIFEST).write_text("[1, 2]")
    with caplog.at_level("WARNING", logger="rotalibi"):
        found = ckpt.find_checkpoints(tmp_path)
    assert [c.step for c in found] == [10]
    text = caplog.text
    assert "step_40: no manifest" in text
    assert "step_30: weights.pt has 7 bytes, 130 when saved" in text
    assert "step_20: trainer_rank_0.pt is missing" in text
    assert "step_50: malformed manifest" in text and "step_60: malformed manifest" in text


def test_same_size_corruption_is_caught_by_the_content_hash(tmp_path):
    _fake_checkpoint(tmp_path, 10)
    [checkpoint] = ckpt.find_checkpoints(tmp_path)
    assert ckpt.verify(checkpoint) is None
    (tmp_path / "step_10" / "weights.pt").write_bytes(b"z" * 110)  # same size, other bytes
    [checkpoint] = ckpt.find_checkpoints(tmp_path)  # the size still matches
    assert (
        ckpt.verify(checkpoint) == "weights.pt is not the file that was saved (its sha256 differs)"
    )
    # Ranks share the work, a file each (in name order): only rank 1 checks weights.pt.
    assert ckpt.verify(checkpoint, rank=0, world_size=2) is None
    assert "weights.pt" in ckpt.verify(checkpoint, rank=1, world_size=2)


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo tampered",))


def test_trainer_state_loads_without_unpickling_code(tmp_path):
    """rotalibi's per-rank state round-trips through weights_only loading; a pickle that would
    run code on load (a tampered trainer_rank_<r>.pt) is refused, not executed."""
    np.random.seed(3)
    random.seed(4)
    state = {"loader": {"positions": [[0, 1, 2]], "version": 1}, "rng": ckpt.rng_state()}
    torch.save(state, tmp_path / "state.pt")
    expected = (np.random.rand(3), random.random(), torch.rand(2))
    ckpt.restore_rng_state(torch.load(tmp_path / "state.pt", weights_only=True)["rng"])
    again = (np.random.rand(3), random.random(), torch.rand(2))
    np.testing.assert_array_equal(expected[0], again[0])
    assert expected[1] == again[1] and torch.equal(expected[2], again[2])

    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"loader": _Payload()}, protocol=2))
    with pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / "evil.pt", weights_only=True)


def test_prune_keeps_the_newest_complete_checkpoints(tmp_path):
    for step in (5, 10, 15, 20):
        _fake_checkpoint(tmp_path, step)
    ckpt.prune(tmp_path, keep=2)
    assert [c.step for c in ckpt.find_checkpoints(tmp_path)] == [15, 20]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_15", "step_20"]


def test_resumed_metrics_keep_the_steps_up_to_the_checkpoint_and_drop_a_torn_line(tmp_path):
    """A run killed mid-write leaves records past its checkpoint and a cut line; both go."""
    lines = [json.dumps({"step": s, "loss": 1 / s}) for s in (1, 2, 3)] + ['{"step": 4, "lo']
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines))
    config = {"run": {"name": tmp_path.name, "dir": str(tmp_path.parent)}}
    logger = MetricsLogger(
        tmp_path, config, loggers=["jsonl"], project="test", start_step=2, max_steps=5
    )
    logger.log({"step": 3, "loss": 0.25})
    logger.close(0)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records == [
        {"step": 1, "loss": 1.0},
        {"step": 2, "loss": 0.5},
        {"step": 3, "loss": 0.25},
    ]


def _holder(path, **fields) -> None:
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "job": None, "since": "then"}
    path.write_text(json.dumps({**holder, **fields}))


def test_run_directory_lock_names_its_holder_and_takes_over_stale_ones(
    tmp_path, monkeypatch, caplog
):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    run = tmp_path / "run"
    lock = RunLock.acquire(run)
    holder = rf"in use by another training process \(host {socket.gethostname()} pid {os.getpid()}"
    with pytest.raises(RunDirError, match=holder):
        RunLock.acquire(run)
    lock.release()
    assert not (run / LOCK_FILE).exists()
    RunLock.acquire(run).release()  # free again

    lock_file = run / LOCK_FILE
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    live_elsewhere = {"host": "other-node", "pid": 1, "job": "77"}
    cases = [
        ({"pid": int(dead.stdout)}, "its process is gone"),  # killed on this host
        ({**live_elsewhere, "job": "42"}, "an earlier attempt of this SLURM job"),  # requeued
        (live_elsewhere, "no heartbeat"),  # its node died: the file is not touched any more
    ]
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    for fields, reason in cases:
        _holder(lock_file, **fields)
        if (
            "SLURM job" in reason
        ):  # untouched for three heartbeats (tests/training/test_run_lock.py)
            old = time.time() - SAME_JOB_STALE_S - 5
            os.utime(lock_file, (old, old))
        if reason == "no heartbeat":
            with pytest.raises(RunDirError, match="host other-node pid 1, SLURM job 77"):
                RunLock.acquire(run)  # touched recently: still held
            old = time.time() - STALE_AFTER_S - 5
            os.utime(lock_file, (old, old))
        with caplog.at_level("WARNING", logger="rotalibi"):
            RunLock.acquire(run).release()
        assert reason in caplog.text
    assert sorted(p.name for p in run.iterdir()) == []  # no stray lock files


def test_write_probe_names_the_path_and_free_space(tmp_path):
    probe_writable(tmp_path / "a" / "b")
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(RunDirError, match=r"cannot write to .*file/checkpoints: .*MiB free"):
        probe_writable(blocker / "checkpoints")


def test_a_checkpoint_with_non_finite_weights_is_never_the_last_good_one(tmp_path):
    for step in (10, 20, 30):
        _fake_checkpoint(tmp_path, step)
    for step in (20, 30):  # saved after an update made the weights infinite
        manifest = json.loads((tmp_path / f"step_{step}" / ckpt.MANIFEST).read_text())
        (tmp_path / f"step_{step}" / ckpt.MANIFEST).write_text(
            json.dumps({**manifest, "finite": False})
        )
    assert ckpt.last_good(tmp_path).step == 10
    (tmp_path / "step_10" / ckpt.MANIFEST).unlink()
    assert ckpt.last_good(tmp_path) is None


def test_weights_are_finite_only_if_every_element_is():
    """What save records, on the full weights (ZeRO 1, 2) or a ZeRO-3 partition (ds_tensor)."""
    engine = type("Engine", (), {})()
    engine.module = torch.nn.Linear(3, 2)
    assert ckpt.weights_finite(engine)
    with torch.no_grad():
        engine.module.weight[1, 2] = float("inf")
    assert not ckpt.weights_finite(engine)
    engine.module = torch.nn.Linear(3, 2)
    engine.module.bias.ds_tensor = torch.tensor([float("nan")])  # this rank's partition
    assert not ckpt.weights_finite(engine)
