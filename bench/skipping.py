"""What ALiBi skipping leaves of the causal tiles: the fused kernel's per-block norms against
the row-global norms it used before (`kernels.alibi_reach`), with and without one outlier token
per row. No timing, no GPU: the fractions follow from the inputs alone.

    .venv/bin/python -m bench.skipping        # T = 4096, 16384, 65536; 8 heads, d = 64

Inputs: q and k with unit-norm rows on average (standard normal / sqrt(d)), the default ALiBi
slopes; "outlier": one token per row, at a third of the sequence, has q and k 10x longer.
Reported: the fraction of the causal 128 x 128 (query tile, key tile) pairs visited at
skip_eps = 1e-6. JSON in bench/results/skipping.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from kernels.alibi_reach import (
    DEFAULT_SKIP_EPS,
    alibi_reach,
    row_reach_bounds,
    visited_blocks,
    visited_fraction,
)
from model.positions import alibi_slopes

RESULTS = Path(__file__).resolve().parent / "results"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--tile", type=int, default=128)
    parser.add_argument("--skip-eps", type=float, default=DEFAULT_SKIP_EPS)
    parser.add_argument("--out", type=Path, default=RESULTS / "skipping.json")
    return parser.parse_args(argv)


def _fractions(length: int, args: argparse.Namespace, outlier: bool) -> dict[str, float]:
    torch.manual_seed(0)
    q, k = torch.randn(2, 1, length, args.heads, args.head_dim) * args.head_dim**-0.5
    if outlier:
        q[:, length // 3] *= 10
        k[:, length // 3] *= 10
    slopes = alibi_slopes(args.heads)
    per_block = visited_fraction(q, k, slopes, eps=args.skip_eps, block=args.tile)
    reach = alibi_reach(q, k, slopes, args.head_dim**-0.5, args.skip_eps)
    causal = visited_blocks(row_reach_bounds(torch.full_like(reach, length), length), args.tile)
    row_global = visited_blocks(row_reach_bounds(reach, length), args.tile) / causal
    return {"per_block": round(per_block.item(), 4), "row_global": round(row_global.item(), 4)}


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    rows = []
    for length in args.lengths:
        for outlier in (False, True):
            row = {"length": length, "outlier": outlier, **_fractions(length, args, outlier)}
            print(json.dumps(row))
            rows.append(row)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    args.out.write_text(json.dumps({"settings": settings, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
