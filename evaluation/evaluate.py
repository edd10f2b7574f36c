"""Extrapolation evaluation of a run's checkpoints or of an export, in one process, outside
training (`python -m launch.evaluate`, launch/evaluate.py): the targets (`resolve`), their
config and tokenizer checks, and `evaluate`, which writes the results files
(evaluation/results.py) and TensorBoard scalars."""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import yaml

from data.manifest import read_manifest
from data.tokenizer import load_tokenizer
from evaluation.extrapolation import Extrapolation, plan_lengths, scalars
from evaluation.results import PLOT_TAG, write_outputs
from model import Transformer
from model.sequence_parallel import SequenceParallel
from training import checkpoint as ckpt
from training.config import Config, ConfigError, check_evaluation_overrides, load_config
from training.distributed import World
from training.engine import precision
from training.metrics import TensorBoardTracker

if TYPE_CHECKING:
    pass

log = logging.getLogger("rotalibi")


class TargetError(ValueError):
    """The evaluation target is not a run, a checkpoint or an export (or not intact)."""


@dataclass(frozen=True)
class Target:
    """One model to evaluate: its step, how to build it (model, train length, tokens), and the
    sha256 of the tokenizer it was trained with."""

    step: int
    source: Path
    load: Callable[[], tuple[Transformer, int, int | None]]
    tokenizer_sha256: str


def check_tokenizer(targets: list[Target], data_path: str) -> None:
    """The held-out text must be tokenized as the models were trained: same tokenizer, by
    content (another tokenizer of the same size gives nonsense, not an error)."""
    found = read_manifest(data_path)["tokenizer_sha256"]
    for target in targets:
        if found != target.tokenizer_sha256:
            raise ConfigError(
                f"{target.source} was trained with tokenizer sha256 "
                f"{target.tokenizer_sha256[:12]}…, but data.path={data_path} has {found[:12]}…: "
                "evaluate on a dataset prepared with the model's tokenizer"
            )


def target_config(
    yaml_text: str, origin: str, overrides: list[str], device: torch.device
) -> Config:
    """The run's config (YAML text) with the evaluation's overrides, checked against the
    evaluation's needs before any model is loaded."""
    check_evaluation_overrides(overrides)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(yaml_text)
        try:
            cfg = load_config(path, overrides)
        except ConfigError as e:
            raise ConfigError(str(e).replace(str(path), origin)) from None
    plan_lengths(cfg, cfg.data.seq_len)
    precision(cfg, device)
    vocab = load_tokenizer(cfg.data.path).get_vocab_size()
    if vocab > cfg.model.vocab_size:
        raise ConfigError(
            f"the tokenizer of {cfg.data.path} has {vocab} tokens, more than the model's "
            f"{cfg.model.vocab_size}: evaluate on the dataset the model was trained on "
            "(data.path=...)"
        )
    return cfg


def _checkpoint_target(checkpoint: ckpt.Checkpoint) -> Target:
    def load():
        from training.export import model_from_checkpoint

        model, config = model_from_checkpoint(checkpoint)
        return model, config["data"]["seq_len"], checkpoint.manifest["tokens"]

    return Target(checkpoint.step, checkpoint.path, load, checkpoint.manifest["tokenizer_sha256"])


def resolve(target: Path, *, step: int | None, every: bool) -> tuple[str, Path, list[Target]]:
    """(the run's config as YAML, the directory outputs go to (the run's, or the target's
    outside a run), the models to evaluate)."""
    if not target.exists():
        raise TargetError(
            f"{target} does not exist; give a run directory, a checkpoint or an export"
        )
    if (target / ckpt.MANIFEST).is_file():  # one checkpoint
        if step is not None or every:
            raise TargetError("--step and --all take a run directory, not a checkpoint")
        found = [c for c in ckpt.find_checkpoints(target.parent) if c.path == target]
        if not found:
            raise TargetError(f"{target} is an incomplete checkpoint (see the warning above)")
        if (problem := ckpt.non_finite_problem(found[0])) is not None:
            raise TargetError(problem)
        run_dir = target.parent.parent
        if not (run_dir / "config.yaml").is_file():
            run_dir = target  # a checkpoint outside its run
        return found[0].manifest["config"], run_dir, [_checkpoint_target(found[0])]
    if (target / "config.json").is_file():  # an export
        if step is not None or every:
            raise TargetError("--step and --all take a run directory, not an export")
        from training.export import load_exported

        meta = json.loads((target / "config.json").read_text())
        if "tokenizer_sha256" not in meta:
            raise TargetError(
                f"{target} was exported by an older rotalibi (no tokenizer sha256 to check the "
                "evaluation's dataset against); export it again with launch.export"
            )
        run_dir = target.parent.parent
        run_config = run_dir / "config.yaml"
        if run_config.is_file():
            yaml_text = run_config.read_text()
        else:  # an export outside its run: its model, trained length and dataset
            data = {"seq_len": meta["train_length"], "path": meta["data_path"]}
            yaml_text = yaml.safe_dump({"model": meta["model"], "data": data})
            run_dir = target

        def load():
            model, meta = load_exported(target)
            return model, meta["train_length"], meta.get("tokens")

        return yaml_text, run_dir, [Target(meta["step"], target, load, meta["tokenizer_sha256"])]
    if (target / "checkpoints").is_dir() or (target / "config.yaml").is_file():  # a run
        from training.export import pick_checkpoint

        if every:  # those with finite weights: the others are named and left out
            chosen = ckpt.find_checkpoints(target / "checkpoints")
            for checkpoint in chosen:
                if not checkpoint.manifest["finite"]:
                    log.warning("leaving out %s: its weights are not finite", checkpoint.path)
            chosen = [c for c in chosen if c.manifest["finite"]]
            if not chosen:
                raise TargetError(f"{target} holds no complete checkpoint with finite weights")
        else:
            chosen = [pick_checkpoint(target, step)]
        return chosen[-1].manifest["config"], target, [_checkpoint_target(c) for c in chosen]
    raise TargetError(
        f"{target} is not a run directory (config.yaml, checkpoints/), a checkpoint "
        f"({ckpt.MANIFEST}) or an export (config.json); e.g. runs/tiny"
    )


def evaluate(
    target: Target,
    cfg: Config,
    device: torch.device,
    out: Path,
    attn_block: int | None = None,
    force: bool = False,
    world: World | None = None,
    sequence_parallel: SequenceParallel | None = None,
) -> dict:
    """Evaluate one target and write its outputs under `out` (attn_block: the blockwise
    attention's tile, if not the checkpoint's; force: replace finite results by non-finite
    ones). In this process alone, or on every rank of `world` (each holding the whole model),
    windows split over `sequence_parallel` groups; rank 0 writes."""
    model, train_length, tokens = target.load()
    if attn_block is not None:
        model.cfg.attn_block = attn_block
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    model = model.to(device).eval()
    for p in model.parameters():  # as DeepSpeed trains: parameters cast, buffers kept
        p.data = p.data.to(dtype[precision(cfg, device)])
    world = world or World(rank=0, world_size=1, local_rank=0, device=device)
    log.info("evaluating %s (step %d) on %s", target.source, target.step, device)
    results = Extrapolation(
        model, cfg, world, train_length=train_length, sequence_parallel=sequence_parallel
    ).run(step=target.step, tokens=tokens)
    if not world.is_main:
        return results
    path, figure = write_outputs(results, out / "eval", force=force)
    tensorboard = TensorBoardTracker(out / "tb")
    tensorboard.scalars(results["step"], scalars(results))
    tensorboard.figure(PLOT_TAG, figure, results["step"])
    tensorboard.close(0)
    log.info("wrote %s and %s", path, path.parent / "ppl_vs_length.png")
    return results
