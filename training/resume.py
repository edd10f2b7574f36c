"""Checks before a run starts or resumes, for launch.train and launch.slurm alike: the newest
checkpoint of the run directory against the config (`resume_point`, `check_global_batch`) and
the dataset against the model (`check_dataset`)."""

from __future__ import annotations

import logging

import yaml

from training import checkpoint as ckpt
from training.config import Config, ConfigError, to_yaml
from training.rundir import RunDirError

log = logging.getLogger("rotalibi")


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(old) | set(new))
    found = []
    for key in keys:
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            found.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return found


def check_global_batch(checkpoint: ckpt.Checkpoint, cfg: Config, world_size: int) -> None:
    """ConfigError unless resuming `checkpoint` on `world_size` ranks keeps its global batch,
    data.batch_size x train.grad_accum x data-parallel ranks (ranks / train.sequence_parallel),
    or train.allow_batch_change lets it change."""
    manifest = checkpoint.manifest
    saved = yaml.safe_load(manifest["config"])
    batch, accum = saved["data"]["batch_size"], saved["train"]["grad_accum"]
    saved_groups = manifest["world_size"] // manifest.get("sequence_parallel", 1)
    groups = world_size // cfg.train.sequence_parallel
    before = batch * accum * saved_groups
    per_step = cfg.data.batch_size * groups
    now = per_step * cfg.train.grad_accum
    if before == now or cfg.train.allow_batch_change:
        return
    fix = (
        f"set train.grad_accum={before // per_step} to keep it"
        if before % per_step == 0
        else "no train.grad_accum keeps it at this data.batch_size"
    )
    raise ConfigError(
        f"{checkpoint.path} was saved with a global batch of {before} rows ({batch} x "
        f"train.grad_accum={accum} x {saved_groups} data-parallel ranks); on {groups} "
        f"data-parallel rank(s) this run's would be {now}: {fix}, or set "
        "train.allow_batch_change=true to change it"
    )


def resume_point(cfg: Config, world_size: int | None = None) -> ckpt.Checkpoint | None:
    """The newest complete checkpoint of the run directory, checked against this config: a
    different model is an error (another run's checkpoints), other changes are logged (so is
    model.attn_block, the CPU attention's tile: the same model computed in other blocks). With
    `world_size`, a global batch that would change is an error too (`check_global_batch`)."""
    found = ckpt.find_checkpoints(cfg.run_dir / "checkpoints")
    if not found:
        return None
    latest = found[-1]
    saved, now = yaml.safe_load(latest.manifest["config"]), yaml.safe_load(to_yaml(cfg))
    model_changes = [
        d
        for d in _differences(saved["model"], now["model"], "model.")
        if not d.startswith("model.attn_block:")
    ]
    if model_changes:
        raise RunDirError(
            f"{cfg.run_dir} holds checkpoints of a different model ({'; '.join(model_changes)}). "
            "Pick another run.name (or run.dir), or delete that directory to start over."
        )
    if world_size is not None:
        check_global_batch(latest, cfg, world_size)
    other = [d for d in _differences(saved, now) if d not in model_changes]
    if other:
        log.warning("resuming %s with a changed config: %s", latest.path, "; ".join(other))
    return latest


def check_dataset(cfg: Config) -> None:
    """Fail early, with the fix, if the dataset is missing or its vocabulary does not fit."""
    from data.tokenizer import load_tokenizer

    vocab = load_tokenizer(cfg.data.path).get_vocab_size()
    if vocab > cfg.model.vocab_size:
        raise ConfigError(
            f"the tokenizer of {cfg.data.path} has {vocab} tokens but model.vocab_size="
            f"{cfg.model.vocab_size}; set model.vocab_size={vocab} (or more)"
        )
