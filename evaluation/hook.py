"""Evaluation inside training: the checkpoint hook launch.train hands to the Trainer
(training/trainer.py, `CheckpointHook`), as torchtitan hands its validator. It evaluates each
checkpoint just saved (evaluation/extrapolation.py) and writes the results files."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from evaluation.extrapolation import Extrapolation, plan_lengths, scalars
from evaluation.results import PLOT_TAG, write_outputs
from training.config import Config

if TYPE_CHECKING:
    from training.trainer import Trainer

log = logging.getLogger("rotalibi")


def _zero3_gathered(params: list[torch.nn.Parameter]):
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def evaluation_hook(cfg: Config) -> Callable[[Trainer, int], dict]:
    """`checkpoint_hook` for launch.train, once the evaluation settings of `cfg` are checked
    (ConfigError before any training otherwise)."""
    plan_lengths(cfg, cfg.data.seq_len)
    return checkpoint_hook


def checkpoint_hook(trainer: Trainer, step: int) -> dict:
    """launch.train's CheckpointHook: evaluate the checkpoint just saved, on every rank (each
    sequence-parallel group on its share of the windows, each window split over the group as in
    training; ZeRO-3 gathering the weights in the engine's forward); rank
    0 writes the outputs. Returns the scalars and (rank 0) the plot for the metrics. A failure
    is logged, and training goes on (the checkpoint is saved; `launch.evaluate` can redo it)."""
    cfg, module = trainer.cfg, trainer.engine.module
    was_training = module.training
    module.eval()
    try:
        evaluation = Extrapolation(
            module,
            cfg,
            trainer.world,
            train_length=cfg.data.seq_len,
            forward=lambda tokens, chunk: trainer.engine(tokens, None, head=False, chunk=chunk),
            gathered=_zero3_gathered,
            sequence_parallel=trainer.sequence_parallel,
        )
        results = evaluation.run(step=step, tokens=trainer.tokens)
        found = scalars(results)
        if trainer.world.is_main:
            found[PLOT_TAG] = write_outputs(results, cfg.run_dir / "eval")[1]
    except Exception:
        log.exception(
            "evaluation of step %d failed; training goes on. Redo it with "
            "`python -m launch.evaluate %s --step %d`",
            step,
            cfg.run_dir,
            step,
        )
        return {}
    finally:
        module.train(was_training)
    return found
