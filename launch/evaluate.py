"""Extrapolation evaluation: `python -m launch.evaluate TARGET [key=value ...]`.

    python -m launch.evaluate runs/tiny                      the newest checkpoint of a run
    python -m launch.evaluate runs/tiny --step 200           one checkpoint (or --all of them)
    python -m launch.evaluate runs/tiny/checkpoints/step_200 a checkpoint directory
    python -m launch.evaluate runs/tiny/export/step_300      an export (launch.export)
        [eval.lengths=[128,1024] eval.windows=4 data.path=... ...] [--out DIR] [--device cuda]
        [--force] [--sequence-parallel N]

One process, on CUDA when there is a GPU, else the CPU; no DeepSpeed engine. Under torchrun
every rank holds the model and takes its share of the windows; `--sequence-parallel N` splits
each window over groups of N ranks as training does (README "Long-context evaluation").
Overrides take `eval.*`, `data.path`, `model.attn_block` and `deepspeed.precision` keys on
top of the run's config (an export outside a run starts from the schema's defaults). Writes,
like the evaluation inside training (`checkpoint_hook`), `eval/step_<N>.json`,
`eval/ppl_vs_length.png` and TensorBoard scalars and image, into the run directory (or --out;
rank 0 under torchrun). evaluation/extrapolation.py says what is measured. A checkpoint is
evaluated only if its files are the ones saved (sha256) and its weights finite (--all leaves
the others out, named), on a dataset of the tokenizer it was trained with; a finite
perplexity already recorded is never replaced by a non-finite one (a corrupted model) unless
--force.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import torch

from data.manifest import DatasetError
from evaluation.evaluate import TargetError, check_tokenizer, evaluate, resolve, target_config
from evaluation.results import ResultsError
from training.config import ConfigError
from training.distributed import init_world, sequence_parallel_group


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m launch.evaluate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("target", type=Path, help="run directory, checkpoint or export")
    parser.add_argument("overrides", nargs="*", help="key=value (eval.*, data.path, ...)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--step", type=int, help="a run's checkpoint (default: the newest)")
    which.add_argument("--all", action="store_true", help="every checkpoint of a run")
    parser.add_argument("--out", type=Path, help="write eval/ and tb/ here (default: the run)")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available")
    parser.add_argument(
        "--force", action="store_true", help="replace finite results by non-finite ones"
    )
    parser.add_argument(
        "--sequence-parallel",
        type=int,
        default=1,
        metavar="N",
        help="under torchrun: split each window over groups of N ranks (default 1)",
    )
    args = parser.parse_intermixed_args(argv)  # options may follow the overrides
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from training.export import ExportError

    try:
        world = None
        ranks = int(os.environ.get("WORLD_SIZE", "1"))
        if args.sequence_parallel < 1 or ranks % args.sequence_parallel:
            raise ConfigError(
                f"--sequence-parallel {args.sequence_parallel} must be at least 1 and divide the "
                f"{ranks} ranks (torchrun --nproc_per_node)"
            )
        if ranks > 1:
            world = init_world()
        device = (
            world.device
            if world
            else torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        )
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda: this machine has no CUDA device; use --device cpu")
        yaml_text, run_dir, targets = resolve(args.target, step=args.step, every=args.all)
        cfg = target_config(yaml_text, f"the config of {args.target}", args.overrides, device)
        heads = (cfg.model.n_heads, cfg.model.kv_heads)
        if any(h % args.sequence_parallel for h in heads):
            raise ConfigError(
                f"--sequence-parallel {args.sequence_parallel} must divide model.n_heads and "
                f"model.n_kv_heads {heads}"
            )
        sp = None if world is None else sequence_parallel_group(world, args.sequence_parallel)
        block = (
            cfg.model.attn_block
            if any(o.startswith("model.attn_block=") for o in args.overrides)
            else None
        )
        check_tokenizer(targets, cfg.data.path)
        for target in targets:
            evaluate(target, cfg, device, args.out or run_dir, block, args.force, world, sp)
    except (TargetError, ExportError, ConfigError, DatasetError, ResultsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
