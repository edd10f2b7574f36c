"""The training loop's parts on their own: launcher environments, the DeepSpeed config, the LR
schedule, FLOP counting and checkpoint completeness."""

from __future__ import annotations

import json
import random

import pytest
import torch

from launch import checkpoint as ckpt
from launch.config import ConfigError, load_config
from launch.distributed import complete_environment, expand_nodelist
from launch.engine import deepspeed_config, lr_multiplier, parameter_groups
from launch.metrics import MetricsLogger, training_flops_per_token
from model import ModelConfig, Transformer

CPU, GPU = torch.device("cpu"), torch.device("cuda", 0)


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
    directory = root / ckpt.tag(step)
    directory.mkdir(parents=True)
    (directory / "weights.pt").write_bytes(b"x" * (100 + step))
    (directory / "trainer_rank_0.pt").write_bytes(b"y" * 10)
    files = {"weights.pt": 100 + step, "trainer_rank_0.pt": 10}
    (directory / ckpt.MANIFEST).write_text(json.dumps({"step": step, "files": files}))


def test_incomplete_and_truncated_checkpoints_are_skipped_with_a_warning(tmp_path, caplog):
    for step in (10, 20, 30, 40):
        _fake_checkpoint(tmp_path, step)
    (tmp_path / "step_40" / ckpt.MANIFEST).unlink()  # killed before the manifest
    (tmp_path / "step_30" / "weights.pt").write_bytes(b"x" * 7)  # truncated by hand
    (tmp_path / "step_20" / "trainer_rank_0.pt").unlink()  # a file lost
    with caplog.at_level("WARNING", logger="rotalibi"):
        found = ckpt.find_checkpoints(tmp_path)
    assert [c.step for c in found] == [10]
    text = caplog.text
    assert "step_40: no manifest" in text
    assert "step_30: weights.pt has 7 bytes, 130 when saved" in text
    assert "step_20: trainer_rank_0.pt is missing" in text


def test_prune_keeps_the_newest_complete_checkpoints(tmp_path):
    for step in (5, 10, 15, 20):
        _fake_checkpoint(tmp_path, step)
    ckpt.prune(tmp_path, keep=2)
    assert [c.step for c in ckpt.find_checkpoints(tmp_path)] == [15, 20]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_15", "step_20"]


def test_rng_state_round_trip():
    state = ckpt.rng_state()
    first = (torch.rand(3), random.random())
    ckpt.restore_rng_state(state)
    again = (torch.rand(3), random.random())
    assert torch.equal(first[0], again[0]) and first[1] == again[1]


def test_resumed_metrics_keep_the_steps_up_to_the_checkpoint_and_drop_a_torn_line(tmp_path):
    """A run killed mid-write leaves records past its checkpoint and a cut line; both go."""
    lines = [json.dumps({"step": s, "loss": 1 / s}) for s in (1, 2, 3)] + ['{"step": 4, "lo']
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines))
    logger = MetricsLogger(tmp_path, start_step=2, max_steps=5)
    logger.log({"step": 3, "loss": 0.25})
    logger.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records == [
        {"step": 1, "loss": 1.0},
        {"step": 2, "loss": 0.5},
        {"step": 3, "loss": 0.25},
    ]
