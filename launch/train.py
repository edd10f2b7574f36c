"""Train a model with DeepSpeed ZeRO: `python -m launch.train CONFIG.yaml [key=value ...]`.

Runs as one process, under `deepspeed --num_gpus N` / `--hostfile`, `torchrun` or `srun` (see
training/distributed.py); the run itself is training/trainer.py, handed the evaluation hook
(evaluation/hook.py). The run directory `<run.dir>/<run.name>/` holds `config.yaml`,
`checkpoints/`, `tb/`, `metrics.jsonl` and `eval/`. Starting a run whose directory holds a
complete checkpoint resumes from the newest one, exactly, on any number of ranks (another
number goes through DeepSpeed's universal checkpoint; see `Trainer._restore`).

Exit codes: 0 finished; 2 bad input (config, dataset, run directory in use or not writable,
checkpoints none of which can be resumed: see `Trainer._verified`), before any step; 3
stopped after `train.max_bad_steps` non-finite steps in a row; 75 (EX_TEMPFAIL) saved a
checkpoint on SIGTERM or SIGUSR1 and asks to be requeued; 130 saved a checkpoint on Ctrl-C
(SIGINT; a second one aborts at once); 1 anything else (a checkpoint that could not be written
says so in one line).
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings

import torch

from data.manifest import DatasetError
from evaluation.summary import RunProgress, run_summary
from training import checkpoint as ckpt
from training.config import Config, ConfigError, load_config, sequence_parallel_problems, to_yaml
from training.distributed import (
    World,
    complete_environment,
    exit_process,
    init_world,
    single_threaded_comm_start,
)
from training.resume import check_dataset, resume_point
from training.rundir import RunDirError
from training.trainer import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    CheckpointHook,
    StopFlag,
    Trainer,
    lock_run_dir,
    open_metrics,
)


def parse_args(argv: list[str]) -> tuple[str, list[str]]:
    """CONFIG.yaml then key=value overrides; the deepspeed launcher's --local_rank is dropped."""
    args = [a for a in argv if not a.startswith("--local_rank")]
    if not args or args[0] in ("-h", "--help"):
        raise ConfigError("usage: python -m launch.train CONFIG.yaml [key=value ...]")
    return args[0], args[1:]


def setup_logging(rank: int) -> None:
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # DeepSpeed calls torch.distributed's deprecated collectives at every step.
    warnings.filterwarnings(
        "ignore", r".*is deprecated\. Please use `torch\.distributed", FutureWarning
    )


def _failed(error: Exception, rank: int, code: int) -> int:
    """Report `error` in one line (from rank 0) and return the exit code."""
    if rank == 0:
        print(f"error: {error}", file=sys.stderr)
    return code


def main(argv: list[str]) -> int:
    stop = StopFlag()  # first: a signal during start-up is acted on at the first step
    complete_environment()
    rank = int(os.environ["RANK"])
    setup_logging(rank)
    try:
        cfg = load_config(*parse_args(argv))
        problems = sequence_parallel_problems(cfg, int(os.environ["WORLD_SIZE"]))
        if problems:
            raise ConfigError(problems[0])
        check_dataset(cfg)
        # A foreign run directory, or a global batch that would change, stops here.
        resume = resume_point(cfg, int(os.environ["WORLD_SIZE"]))
        hooks = []
        if cfg.eval.every_checkpoint:
            from evaluation.hook import evaluation_hook

            hooks.append(evaluation_hook(cfg))
    except (ConfigError, DatasetError, RunDirError) as e:
        return _failed(e, rank, EXIT_BAD_INPUT)
    world = init_world()
    code = _train(cfg, world, resume, hooks, stop)
    # Every rank gets here (errors are shared before returning). Not on an exception: a rank
    # still in a collective would keep the others waiting.
    torch.distributed.destroy_process_group()
    return code


def _train(
    cfg: Config,
    world: World,
    resume: ckpt.Checkpoint | None,
    hooks: list[CheckpointHook],
    stop: StopFlag,
) -> int:
    """Lock the run directory, build the trainer and run it; the exit code."""
    rank = world.rank
    try:
        lock = lock_run_dir(cfg.run_dir, world)
    except RunDirError as e:
        return _failed(e, rank, EXIT_BAD_INPUT)
    try:
        try:
            with single_threaded_comm_start(world.device):
                trainer = Trainer(cfg, world, resume, hooks)
        except (ConfigError, DatasetError, RunDirError) as e:
            return _failed(e, rank, EXIT_BAD_INPUT)
        except ckpt.CheckpointError as e:  # a universal conversion that failed
            return _failed(e, rank, EXIT_FAILED)
        if world.is_main:
            (cfg.run_dir / "config.yaml").write_text(to_yaml(cfg))
        first_step, start = trainer.step, time.perf_counter()
        try:
            metrics = open_metrics(cfg, first_step, world)
        except ConfigError as e:
            return _failed(e, rank, EXIT_BAD_INPUT)
        code = EXIT_FAILED
        try:
            code = trainer.run(stop, metrics)
        except ckpt.CheckpointError as e:
            code = _failed(e, rank, EXIT_FAILED)
        finally:
            if metrics is not None:
                metrics.close(code)
        if world.is_main:
            progress = RunProgress(
                first_step=first_step,
                last_step=trainer.step,
                tokens=trainer.tokens,
                tokens_now=(trainer.step - first_step) * trainer.tokens_per_step,
                seconds=time.perf_counter() - start,
                loss=trainer.last_loss,
            )
            print(run_summary(cfg, progress, code), file=sys.stderr, flush=True)
        return code
    finally:
        if lock is not None:
            lock.release()


if __name__ == "__main__":
    exit_process(main(sys.argv[1:]))
