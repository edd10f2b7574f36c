"""Sequence-parallel evaluation on the ranks of a torchrun job, next to the same evaluation on
one rank (tests/evaluation/test_eval_sequence_parallel.py).

Usage (torchrun --nproc_per_node N tests/helpers/sequence_parallel_eval_worker.py ...):
    ... OUT.json DATASET SCHEME...

For each scheme, a float32 model of configs/tiny.yaml's shape with grouped-query heads and
weights moved off their initialisation is evaluated (evaluation.extrapolation) on DATASET by all
N ranks as one sequence-parallel group: each window split over the ranks, the diagnostics'
windows dealt whole over them. Rank 0 then evaluates the same model alone and writes, per
scheme, both results.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import ClassVar

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from evaluation.extrapolation import Extrapolation
from model import Transformer
from model.sequence_parallel import SequenceParallel
from training.config import load_config
from training.distributed import World, exit_process

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = [
    "data.seq_len=32",
    "eval.lengths=[32,63,256]",  # 63: not a multiple of the group's 2 ranks (padded)
    "eval.windows=3",
    "eval.chunk=12",
    "eval.diagnostic_lengths=[63]",
    "eval.passkey_lengths=[256]",
    "eval.passkey_depths=[0.0,1.0]",
    "eval.passkey_trials=1",
    "model.n_kv_heads=2",
]


class CountedGroup(SequenceParallel):
    """A sequence-parallel group that counts the attention outputs it brings back to tokens:
    the proof that the windows ran split."""

    calls: ClassVar[list[int]] = [0]

    def to_tokens(self, x: torch.Tensor) -> torch.Tensor:
        self.calls[0] += 1
        return super().to_tokens(x)


def evaluate(dataset: str, scheme: str, world: World, sp: SequenceParallel | None) -> dict:
    cfg = load_config(
        ROOT / "configs" / "tiny.yaml",
        [f"data.path={dataset}", f"model.scheme={scheme}", *SETTINGS],
    )
    torch.manual_seed(0)
    model = Transformer(cfg.model, train_length=32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    evaluation = Extrapolation(model.eval(), cfg, world, train_length=32, sequence_parallel=sp)
    return evaluation.run(step=0)


def main(out: str, dataset: str, schemes: list[str]) -> None:
    import deepspeed

    deepspeed.init_distributed("gloo", verbose=False)
    rank, size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    cpu = torch.device("cpu")
    sp = CountedGroup(torch.distributed.group.WORLD, size, rank)
    report = {}
    for scheme in schemes:
        before = sp.calls[0]
        split = evaluate(dataset, scheme, World(rank, size, rank, cpu), sp)
        if rank == 0:
            whole = evaluate(dataset, scheme, World(0, 1, 0, cpu), None)
            report[scheme] = {"split": split, "whole": whole, "calls": sp.calls[0] - before}
        torch.distributed.barrier()
    if rank == 0:
        Path(out).write_text(json.dumps(report, indent=1))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
    exit_process(0)
