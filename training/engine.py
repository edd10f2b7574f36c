"""The DeepSpeed engine of a run: its JSON config, the AdamW parameter groups, the LR schedule.

Everything DeepSpeed needs is derived from the OmegaConf `Config`, so the YAML stays the one
place a user edits. On the CPU the optimizer is torch's AdamW (DeepSpeed's CPU Adam would
JIT-compile a C++ extension first); on CUDA it is DeepSpeed's fused AdamW.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from model import Transformer
from training.config import Config, ConfigError


def precision(cfg: Config, device: torch.device) -> str:
    """The training precision: `auto` is bf16 on CUDA and fp32 on the CPU."""
    chosen = cfg.deepspeed.precision
    if chosen == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if device.type == "cpu" and chosen != "fp32":
        raise ConfigError(
            f"deepspeed.precision={chosen} needs a GPU; on the CPU use deepspeed.precision=fp32 "
            "(or auto)"
        )
    return chosen


def deepspeed_config(cfg: Config, world_size: int, device: torch.device) -> dict:
    """The DeepSpeed JSON for this run."""
    ds, train = cfg.deepspeed, cfg.train
    zero: dict = {
        "stage": ds.zero_stage,
        "reduce_bucket_size": ds.reduce_bucket_size,
    }
    if ds.zero_stage == 3:
        zero["stage3_prefetch_bucket_size"] = ds.prefetch_bucket_size
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device.type == "cuda"}
    if ds.offload_params:
        if ds.zero_stage != 3:
            raise ConfigError("deepspeed.offload_params needs deepspeed.zero_stage=3")
        zero["offload_param"] = {"device": "cpu", "pin_memory": device.type == "cuda"}
    chosen = precision(cfg, device)
    config = {
        # ZeRO skips a step whose gradient norm is not finite (was_step_applied() says so).
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": cfg.data.batch_size * train.grad_accum * world_size,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": chosen == "bf16"},
        "fp16": {"enabled": chosen == "fp16", "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**62,  # rotalibi logs itself
        "wall_clock_breakdown": False,
    }
    if device.type == "cuda":
        config["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": train.lr, "betas": list(train.betas), "eps": 1e-8},
        }
    return config


def zero_init(cfg: Config, world_size: int) -> bool:
    """Whether the model is built under deepspeed.zero.Init (see DeepSpeedConfig.zero_init)."""
    chosen = cfg.deepspeed.zero_init
    if chosen is None:
        return cfg.deepspeed.zero_stage == 3 and world_size > 1
    if chosen and cfg.deepspeed.zero_stage != 3:
        raise ConfigError("deepspeed.zero_init needs deepspeed.zero_stage=3")
    return chosen


def build_model(cfg: Config, world_size: int, device: torch.device) -> Transformer:
    """The model, initialised from run.seed. Under zero.Init every module's parameters are
    partitioned over the ranks as soon as it is built, so no rank ever holds the whole model;
    the weights are the same as a full construction's, bit for bit."""
    torch.manual_seed(cfg.run.seed)
    if not zero_init(cfg, world_size):
        return Transformer(cfg.model, train_length=cfg.data.seq_len)
    import deepspeed

    with deepspeed.zero.Init(config_dict_or_path=deepspeed_config(cfg, world_size, device)):
        return Transformer(cfg.model, train_length=cfg.data.seq_len)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: not on norms, biases, angle/bias scalars, embeddings.
    Two groups, in this order: decayed, not decayed."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        shape = getattr(p, "ds_shape", p.shape)  # a ZeRO-3 partition is flat: its full shape
        is_matrix = len(shape) >= 2 and "embed" not in name
        (decay if is_matrix else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def lr_multiplier(step: int, cfg: Config) -> float:
    """Linear warmup to 1, then cosine decay to `min_lr_ratio` at `max_steps`."""
    train = cfg.train
    if step < train.warmup_steps:
        return (step + 1) / train.warmup_steps
    span = max(1, train.max_steps - train.warmup_steps)
    progress = min(1.0, (step - train.warmup_steps) / span)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return train.min_lr_ratio + (1 - train.min_lr_ratio) * cosine


def repair_universal_load(engine, cfg: Config) -> None:
    """Undo what DeepSpeed's universal loading (0.19, ZeRO-3) gets wrong for torch's AdamW: it
    gives every parameter group the first one's hyperparameters, and every group's state one
    shared `step` tensor, which AdamW then advances once per group at each step (wrong bias
    corrections). Each group gets its weight decay back (`parameter_groups`' order) and a step
    count of its own."""
    decays = (cfg.train.weight_decay, 0.0)
    for group, decay in zip(engine.optimizer.param_groups, decays, strict=True):
        group["weight_decay"] = decay
    for state in engine.optimizer.optimizer.state.values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].clone()


def build_engine(
    model: nn.Module,
    cfg: Config,
    world_size: int,
    device: torch.device,
    *,
    load_universal: bool = False,
):
    """deepspeed.initialize with ZeRO, AdamW and the warmup + cosine schedule; with
    `load_universal`, its load_checkpoint reads universal checkpoints (checkpoint.to_universal)."""
    import deepspeed

    config = deepspeed_config(cfg, world_size, device)
    if load_universal:
        config["checkpoint"] = {"load_universal": True}
    groups = parameter_groups(model, cfg.train.weight_decay)
    optimizer = None
    if "optimizer" not in config:
        optimizer = torch.optim.AdamW(groups, lr=cfg.train.lr, betas=tuple(cfg.train.betas))
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        model_parameters=groups if optimizer is None else None,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: lr_multiplier(step, cfg)
        ),
        config=config,
    )
    return engine
