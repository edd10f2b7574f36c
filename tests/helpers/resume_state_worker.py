"""Run by test_scale under torchrun: resume a run the way launch.train does (on this number of
ranks: natively, or through DeepSpeed's universal checkpoint) and save, from rank 0, every
parameter's full float32 weights and Adam moments as loaded
(`python tests/helpers/resume_state_worker.py OUT.pt CONFIG.yaml key=value ...`)."""

from __future__ import annotations

import os
import sys

import torch
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

from training.config import load_config
from training.distributed import complete_environment, exit_process, init_world
from training.resume import resume_point
from training.trainer import Trainer


def main(out: str, config: str, *overrides: str) -> None:
    complete_environment()
    cfg = load_config(config, list(overrides))
    resume = resume_point(cfg, int(os.environ["WORLD_SIZE"]))
    world = init_world()
    trainer = Trainer(cfg, world, resume)
    state = {}
    for name, param in trainer.engine.module.named_parameters():
        state[name] = {
            "fp32": safe_get_full_fp32_param(param),
            "exp_avg": safe_get_full_optimizer_state(param, "exp_avg"),
            "exp_avg_sq": safe_get_full_optimizer_state(param, "exp_avg_sq"),
        }
    trainer.loader.close()
    if world.is_main:
        torch.save({"step": trainer.step, "state": state}, out)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
    exit_process(0)
