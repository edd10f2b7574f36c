"""The CPU attention path (`kernels.blockwise`) against PyTorch's SDPA, and what ALiBi skipping
saves. Run on an idle machine:

    .venv/bin/python -m bench.attention_cpu               # T = 4096 and 8192, d = 64, 4 heads

The hybrid attention (q, k, v rotated by accumulated angles, ALiBi, the output rotated back),
float32, batch 1, is timed forward and forward+backward (median of --repeats runs) as:

    sdpa        the rotations + torch SDPA given the ALiBi bias and the causal mask as one
                explicit float mask [H, T, T] (built once, outside the timing): the baseline
    blockwise   kernels.attention, no skipping, at each --blocks tile (the best one is compared)
    skipping    kernels.attention with skip_eps (default 1e-6), at the best tile

and the skipping run's largest deviation from no skipping is recorded. It also reports, for
T = --reach-length with 8 heads and the default slopes, how many (query block, key block) pairs
the reach leaves of the causal ones (random unit-variance q and k, d = 64). JSON in
bench/results/attention_cpu_<machine>.json; the ratios are within this one run.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

import kernels
from bench import median_seconds
from kernels import AlibiTable
from kernels.alibi_reach import DEFAULT_SKIP_EPS, alibi_reach
from model.positions import alibi_slopes, rope_frequencies

RESULTS = Path(__file__).resolve().parent / "results"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--blocks", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--skip-eps", type=float, default=DEFAULT_SKIP_EPS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--reach-length", type=int, default=16384)
    parser.add_argument("--machine", default="vm", help="names the JSON file")
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args(argv)


def _inputs(length: int, heads: int, head_dim: int) -> dict[str, Tensor]:
    torch.manual_seed(0)
    theta = rope_frequencies(head_dim, 10000.0).float()
    delta = theta * (1 + 0.5 * torch.randn(1, length, heads, head_dim // 2))
    slopes = alibi_slopes(heads).float()
    table = -slopes[:, None] * torch.arange(length, dtype=torch.float32)
    q, k, v = (torch.randn(1, length, heads, head_dim, requires_grad=True) for _ in range(3))
    return dict(q=q, k=k, v=v, angles=delta.cumsum(1), bias=AlibiTable.wrap(table, slopes))


def _blockwise(x: dict[str, Tensor], block: int, skip_eps: float) -> Callable[[], Tensor]:
    def run() -> Tensor:
        return kernels.attention(
            x["q"], x["k"], x["v"], angles=x["angles"], rotate_values=True, bias=x["bias"],
            skip_eps=skip_eps, block=block,
        )  # fmt: skip

    return run


def _sdpa(x: dict[str, Tensor]) -> Callable[[], Tensor]:
    T = x["q"].shape[1]
    dist = torch.arange(T)[:, None] - torch.arange(T)[None, :]
    mask = x["bias"][:, dist.clamp(min=0)].masked_fill(dist < 0, float("-inf"))
    angles = x["angles"]

    def run() -> Tensor:
        q, k, v = (kernels.rotate(x[n], angles).transpose(1, 2) for n in ("q", "k", "v"))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return kernels.rotate(o.transpose(1, 2), -angles)

    return run


def _measure(run: Callable[[], Tensor], leaves: list[Tensor], repeats: int) -> dict:
    """Median seconds of forward and of forward+backward; the forward's output."""
    out = run()
    upstream = torch.randn_like(out)
    with torch.no_grad():
        fwd = median_seconds(run, repeats)
    fwd_bwd = median_seconds(lambda: torch.autograd.grad(run(), leaves, upstream), repeats)
    return {"fwd_s": fwd, "fwd_bwd_s": fwd_bwd, "out": out.detach()}


def visited_pairs(length: int, heads: int, head_dim: int, block: int, eps: float) -> dict:
    """Of the causal (query block, key block) pairs at `length`, those within reach."""
    torch.manual_seed(0)
    q, k = torch.randn(2, 1, length, heads, head_dim)
    reach = alibi_reach(q, k, alibi_slopes(heads), head_dim**-0.5, eps)[0]
    n = -(-length // block)
    steps = ((reach - 1 + block - 1) // block + 1).clamp(1, n).tolist()
    per_head = [sum(min(c + 1, s) for c in range(n)) for s in steps]
    causal = n * (n + 1) // 2
    return {
        "length": length, "heads": heads, "head_dim": head_dim, "block": block, "eps": eps,
        "reach_tokens": reach.tolist(), "visited_pairs": per_head, "causal_pairs": causal,
        "visited_fraction": sum(per_head) / (heads * causal),
    }  # fmt: skip


def run_benchmark(args: argparse.Namespace) -> dict:
    report = {
        "machine": args.machine, "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
        "head_dim": args.head_dim, "heads": args.heads, "skip_eps": args.skip_eps, "lengths": {},
    }  # fmt: skip
    steps = [(T, b) for T in args.lengths for b in ["sdpa", *args.blocks, "skipping"]]
    bar = tqdm(steps, desc="attention_cpu", unit="run")
    for T in args.lengths:
        x = _inputs(T, args.heads, args.head_dim)
        leaves = [x["q"], x["k"], x["v"]]
        row: dict = {}
        bar.set_postfix(T=T, method="sdpa")
        row["sdpa"] = _measure(_sdpa(x), leaves, args.repeats)
        bar.update()
        for block in args.blocks:
            bar.set_postfix(T=T, method=f"blockwise {block}")
            row[f"blockwise_{block}"] = _measure(_blockwise(x, block, 0.0), leaves, args.repeats)
            bar.update()
        best = min(args.blocks, key=lambda b: row[f"blockwise_{b}"]["fwd_bwd_s"])
        bar.set_postfix(T=T, method=f"skipping {best}")
        row["skipping"] = _measure(_blockwise(x, best, args.skip_eps), leaves, args.repeats)
        bar.update()
        full = row[f"blockwise_{best}"]
        deviation = (row["skipping"]["out"] - full["out"]).abs().max() / full["out"].abs().max()
        sdpa_error = (row["sdpa"]["out"] - full["out"]).abs().max() / full["out"].abs().max()
        for result in row.values():
            del result["out"]
        row["best_block"] = best
        row["ratios"] = {
            "blockwise_over_sdpa_fwd": full["fwd_s"] / row["sdpa"]["fwd_s"],
            "blockwise_over_sdpa_fwd_bwd": full["fwd_bwd_s"] / row["sdpa"]["fwd_bwd_s"],
            "no_skip_over_skip_fwd": full["fwd_s"] / row["skipping"]["fwd_s"],
            "no_skip_over_skip_fwd_bwd": full["fwd_bwd_s"] / row["skipping"]["fwd_bwd_s"],
        }
        row["skipping_relative_deviation"] = deviation.item()
        row["sdpa_relative_deviation"] = sdpa_error.item()
        report["lengths"][str(T)] = row
    bar.close()
    report["reach"] = visited_pairs(args.reach_length, 8, 64, 64, args.skip_eps)
    return report


def _table(report: dict) -> str:
    lines = [f"{'T':>6} {'block':>5} {'blockwise/sdpa fwd':>19} {'fwd+bwd':>8} "
             f"{'no-skip/skip fwd':>17} {'fwd+bwd':>8}"]  # fmt: skip
    for T, row in report["lengths"].items():
        r = row["ratios"]
        lines.append(
            f"{T:>6} {row['best_block']:>5} {r['blockwise_over_sdpa_fwd']:>19.2f} "
            f"{r['blockwise_over_sdpa_fwd_bwd']:>8.2f} {r['no_skip_over_skip_fwd']:>17.2f} "
            f"{r['no_skip_over_skip_fwd_bwd']:>8.2f}"
        )
    reach = report["reach"]
    lines.append(
        f"T = {reach['length']}, 8 heads, default slopes: {reach['visited_fraction']:.1%} of the "
        f"causal key blocks within reach (per head: {reach['visited_pairs']} of "
        f"{reach['causal_pairs']})"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    out = args.out or RESULTS / f"attention_cpu_{args.machine}.json"
    report = run_benchmark(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(_table(report))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
