"""Sequence parallelism (DeepSpeed-Ulysses, `model/sequence_parallel.py`) against data
parallelism on the same ranks: tokens/s of a training step and the bytes each rank saves for
the backward. Run on an idle machine:

    .venv/bin/python -m bench.sequence_parallel            # 2 ranks, T = 4096 and 8192

It starts itself under torchrun (gloo on the CPU, NCCL on GPUs) with --ranks processes. Each
rank runs the forward and backward of configs/tiny.yaml's model (or --config's) on one row of
packed documents, --repeats times after a warm-up, in two layouts:

    N = 1   every rank holds its own whole sequence (data parallel): the baseline
    N = R   the R ranks share one sequence, each holding 1/R of its tokens

tokens/s counts the job's tokens per second (R sequences a step for N = 1, one for N = R);
saved bytes are what autograd keeps for the backward on one rank (saved_tensors_hooks). On
the CPU each rank is given one thread. JSON in bench/results/sequence_parallel_<machine>.json;
the ratios are within this one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from bench import median_seconds
from training.distributed import exit_process

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


@contextmanager
def saved_for_backward() -> Iterator[list[int]]:
    """Counts the bytes autograd saves for the backward inside the block: [bytes]."""
    saved = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield saved


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the config")
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--machine", default="vm", help="names the JSON file")
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args(argv)


def _packed_row(length: int, vocab: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Tokens, targets, doc_ids [1, length]: 7 documents, boundaries inside the slices."""
    gen = torch.Generator().manual_seed(length)
    text = torch.randint(0, vocab, (1, length + 1), generator=gen)
    doc_ids = (torch.arange(length) * 7 // length)[None]
    return tuple(t.to(device) for t in (text[:, :-1], text[:, 1:], doc_ids))


def _step(model: torch.nn.Module, row: tuple[torch.Tensor, ...]) -> Callable[[], int]:
    """One forward and backward; returns the bytes saved for its backward."""

    def run() -> int:
        tokens, targets, doc_ids = row
        with saved_for_backward() as saved:
            total, count = model(tokens, doc_ids, targets=targets)
        (total / count).backward()
        return saved[0]

    return run


def _measure(run: Callable[[], int], repeats: int, device: torch.device) -> tuple[float, int]:
    """The slowest rank's median step time (every rank's step ends the job's) and saved bytes."""
    saved = run()

    def synchronised() -> None:
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        torch.distributed.barrier()

    seconds = torch.tensor([median_seconds(synchronised, repeats)], dtype=torch.float64)
    torch.distributed.all_reduce(seconds, op=torch.distributed.ReduceOp.MAX)
    return seconds.item(), saved


def worker(args: argparse.Namespace) -> dict:
    """This rank's part of the benchmark; the report (complete on rank 0)."""
    import deepspeed

    from model import Transformer
    from model.sequence_parallel import SequenceParallel
    from training.config import load_config

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    deepspeed.init_distributed("nccl" if cuda else "gloo", verbose=False)  # its all-to-all
    rank, ranks = torch.distributed.get_rank(), torch.distributed.get_world_size()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if not cuda:
        torch.set_num_threads(1)
    cfg = load_config(args.config, args.overrides)
    torch.manual_seed(0)
    model = Transformer(cfg.model, train_length=cfg.data.seq_len).to(device)
    sp = SequenceParallel(torch.distributed.group.WORLD, ranks, rank)
    report: dict = {
        "machine": args.machine, "device": torch.cuda.get_device_name() if cuda else "cpu",
        "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
        "threads_per_rank": torch.get_num_threads(), "ranks": ranks, "config": args.config,
        "overrides": args.overrides,
        "scheme": cfg.model.scheme, "lengths": {},
    }  # fmt: skip
    for length in args.lengths:
        row = _packed_row(length, cfg.model.vocab_size, device)
        model.sequence_parallel = None
        whole_s, whole_saved = _measure(_step(model, row), args.repeats, device)
        model.sequence_parallel = sp
        split_s, split_saved = _measure(_step(model, row), args.repeats, device)
        report["lengths"][str(length)] = {
            "data_parallel": {
                "step_s": whole_s,
                "tokens_per_s": ranks * length / whole_s,
                "saved_bytes_per_rank": whole_saved,
            },
            "sequence_parallel": {
                "step_s": split_s,
                "tokens_per_s": length / split_s,
                "saved_bytes_per_rank": split_saved,
            },
            "ratios": {
                "tokens_per_s_sp_over_dp": whole_s / (ranks * split_s),
                "saved_bytes_sp_over_dp": split_saved / whole_saved,
            },
        }
        if rank == 0:
            print(f"T={length}: {json.dumps(report['lengths'][str(length)]['ratios'])}")
    torch.distributed.destroy_process_group()
    return report


def _table(report: dict) -> str:
    lines = [
        f"{report['ranks']} ranks, {report['device']}, {report['config']} ({report['scheme']})",
        f"{'T':>6} {'N=1 tok/s':>10} {'N=R tok/s':>10} {'ratio':>6} {'N=1 saved MB':>13} "
        f"{'N=R saved MB':>13} {'ratio':>6}",
    ]
    for T, row in report["lengths"].items():
        dp, sp, r = row["data_parallel"], row["sequence_parallel"], row["ratios"]
        lines.append(
            f"{T:>6} {dp['tokens_per_s']:>10.0f} {sp['tokens_per_s']:>10.0f} "
            f"{r['tokens_per_s_sp_over_dp']:>6.2f} {dp['saved_bytes_per_rank'] / 1e6:>13.1f} "
            f"{sp['saved_bytes_per_rank'] / 1e6:>13.1f} {r['saved_bytes_sp_over_dp']:>6.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    out = args.out or RESULTS / f"sequence_parallel_{args.machine}.json"
    if "RANK" in os.environ:  # a torchrun worker
        report = worker(args)
        if int(os.environ["RANK"]) == 0:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=1))
            print(_table(report))
            print(f"wrote {out}")
        return 0
    torchrun = Path(sys.executable).parent / "torchrun"
    command = [str(torchrun), "--standalone", "--nproc_per_node", str(args.ranks)]
    forwarded = sys.argv[1:] if argv is None else argv
    done = subprocess.run([*command, "-m", "bench.sequence_parallel", *forwarded], cwd=ROOT)
    return done.returncode


if __name__ == "__main__":
    exit_process(main())
