"""Speed and memory of the fused hybrid attention against its baselines, on one CUDA GPU.

    make bench-attention                     # or: .venv/bin/python -m bench.attention
    .venv/bin/python -m bench.attention --lengths 8192 32768 --head-dims 128

For every T and head dim d (bfloat16, width 2048 so 2048/d heads, about 16k tokens per batch)
it times forward, backward and forward+backward (median of CUDA-synchronised runs) and the peak
memory of forward+backward, for:

    hybrid        kernels.hybrid_attention: angle scan + fused kernel (q, k, v rotated, ALiBi)
    hybrid_skip   the same, skipping the key blocks beyond ALiBi's reach (skip_eps 1e-6)
    fa2_alibi     FlashAttention-2's flash_attn_func with alibi_slopes (every block computed)
    fa2_window    FlashAttention-2 with a 4096-token sliding window, no bias
    sdpa_flash    torch SDPA, flash backend, plain causal attention: the ceiling
    flex_composed the same hybrid attention composed from torch ops: angles by
                  kernels.angles.accumulate_angles, q, k, v rotated by kernels.rotate,
                  FlexAttention with an ALiBi score_mod and a causal block mask, output rotated
                  back: the baseline the fused kernel has to beat
    fla_path      flash-linear-attention's PaTH kernel, when `fla` is importable

TFLOP/s use the causal attention count for every method: forward 2 * B * HQ * T^2 * d (two
matmuls over half the score matrix), backward 2.5x that. Each shape also carries
`bench.attention_cost`'s model of the fused kernel's matmul FLOPs and HBM bytes, pass by pass,
next to FlashAttention-2's. The JSON (with the device name) goes to bench/results/; the tables
printed at the end give hybrid's ratios to the baselines, and the modelled FLOPs and bytes.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from bench.attention_cost import Shape as CostShape
from bench.attention_cost import summary as cost_summary
from bench.attention_cost import table as cost_table

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = (
    "hybrid", "hybrid_skip", "fa2_alibi", "fa2_window", "sdpa_flash", "flex_composed", "fla_path"
)  # fmt: skip
FA2_WINDOW = 4096  # fa2_window's sliding window: what skipping competes with


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 32768, 131072])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--width", type=int, default=2048, help="model width: heads = width / d")
    parser.add_argument("--tokens", type=int, default=16384, help="tokens per batch (B = this/T)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--rep-ms", type=int, default=200, help="timing budget per measurement")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: results/)")
    return parser.parse_args(argv)


def _inputs(batch: int, length: int, heads: int, head_dim: int, device="cuda") -> dict[str, Tensor]:
    """bfloat16 q, k, v [B, T, H, d], float32 increments around RoPE's, ALiBi slopes."""
    from model.positions import alibi_slopes, rope_frequencies

    def randn(*shape):
        return torch.randn(*shape, device=device, dtype=torch.bfloat16, requires_grad=True)

    theta = rope_frequencies(head_dim, 10000.0).float().to(device)
    delta = theta * (1 + 0.5 * torch.randn(batch, length, heads, head_dim // 2, device=device))
    w = F.normalize(torch.randn(batch, length, heads, head_dim, device=device), dim=-1)
    return dict(
        q=randn(batch, length, heads, head_dim),
        k=randn(batch, length, heads, head_dim),
        v=randn(batch, length, heads, head_dim),
        delta=delta.requires_grad_(),
        slopes=alibi_slopes(heads).float().to(device),
        w=w.to(torch.bfloat16).requires_grad_(),
        beta=(2 * torch.rand(batch, length, heads, device=device)).to(torch.bfloat16),
    )


def _hybrid(x: dict[str, Tensor]) -> tuple[Callable[[], Tensor], list[Tensor]]:
    from kernels import hybrid_attention

    def run():
        return hybrid_attention(x["q"], x["k"], x["v"], x["delta"], x["slopes"])

    return run, [x["q"], x["k"], x["v"], x["delta"]]


def _hybrid_skip(x: dict[str, Tensor]) -> tuple[Callable[[], Tensor], list[Tensor]]:
    from kernels import hybrid_attention
    from kernels.alibi_reach import DEFAULT_SKIP_EPS

    def run():
        return hybrid_attention(
            x["q"], x["k"], x["v"], x["delta"], x["slopes"], skip_eps=DEFAULT_SKIP_EPS
        )

    return run, [x["q"], x["k"], x["v"], x["delta"]]


def _fa2(x: dict[str, Tensor], **options) -> tuple[Callable[[], Tensor], list[Tensor]]:
    from flash_attn import flash_attn_func

    def run():
        return flash_attn_func(x["q"], x["k"], x["v"], causal=True, **options)

    return run, [x["q"], x["k"], x["v"]]


def _fa2_alibi(x: dict[str, Tensor]) -> tuple[Callable[[], Tensor], list[Tensor]]:
    return _fa2(x, alibi_slopes=x["slopes"])


def _fa2_window(x: dict[str, Tensor]) -> tuple[Callable[[], Tensor], list[Tensor]]:
    return _fa2(x, window_size=(FA2_WINDOW - 1, 0))


def _sdpa_flash(x: dict[str, Tensor]) -> tuple[Callable[[], Tensor], list[Tensor]]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (x[n].transpose(1, 2) for n in "qkv")

    def run():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    return run, [x["q"], x["k"], x["v"]]


def _flex_composed(x: dict[str, Tensor]) -> tuple[Callable[[], Tensor], list[Tensor]]:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from kernels.angles import accumulate_angles, rotate

    length = x["q"].shape[1]
    slopes = x["slopes"]

    def alibi(score, b, h, q_idx, kv_idx):
        return score - slopes[h] * (q_idx - kv_idx)

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    mask = create_block_mask(
        causal, B=None, H=None, Q_LEN=length, KV_LEN=length, device=x["q"].device
    )
    flex = torch.compile(flex_attention, dynamic=False)

    def run():
        phi = accumulate_angles(x["delta"])
        q, k, v = (rotate(x[n], phi).transpose(1, 2) for n in "qkv")
        o = flex(q, k, v, score_mod=alibi, block_mask=mask).transpose(1, 2)
        return rotate(o, -phi)

    return run, [x["q"], x["k"], x["v"], x["delta"]]


def _fla_path(x: dict[str, Tensor]) -> tuple[Callable[[], Tensor], list[Tensor]]:
    from fla.ops.path_attn.parallel import parallel_path_attention

    def run():
        out = parallel_path_attention(x["q"], x["k"], x["v"], x["w"], x["beta"])
        return out[0] if isinstance(out, tuple) else out

    return run, [x["q"], x["k"], x["v"], x["w"]]


BUILDERS = {
    "hybrid": _hybrid,
    "hybrid_skip": _hybrid_skip,
    "fa2_alibi": _fa2_alibi,
    "fa2_window": _fa2_window,
    "sdpa_flash": _sdpa_flash,
    "flex_composed": _flex_composed,
    "fla_path": _fla_path,
}


def _available(method: str) -> str | None:
    """None when the method can run here, else why not."""
    if method.startswith("fa2"):
        try:
            import flash_attn  # noqa: F401
        except ImportError as error:
            return f"flash-attn not importable ({error}); it is the `gpu` extra"
    if method == "fla_path":
        try:
            import fla.ops.path_attn.parallel  # noqa: F401
        except ImportError as error:
            return f"flash-linear-attention not importable ({error})"
    return None


def _measure(run: Callable[[], Tensor], leaves: list[Tensor], rep_ms: int) -> dict[str, float]:
    """Median milliseconds of forward, backward, forward+backward; peak MiB of fwd+bwd."""
    from triton.testing import do_bench

    out = run()
    grad = torch.randn_like(out)

    def backward_only():
        torch.autograd.grad(out, leaves, grad, retain_graph=True)

    def forward_backward():
        torch.autograd.grad(run(), leaves, grad)

    result = {
        "fwd_ms": do_bench(lambda: run(), rep=rep_ms, return_mode="median"),
        "bwd_ms": do_bench(backward_only, rep=rep_ms, return_mode="median"),
        "fwd_bwd_ms": do_bench(forward_backward, rep=rep_ms, return_mode="median"),
    }
    out = None  # free the retained graph before measuring the peak
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    forward_backward()
    torch.cuda.synchronize()
    result["peak_mib"] = (torch.cuda.max_memory_allocated() - before) / 2**20
    return result


def _flops(batch: int, heads: int, length: int, head_dim: int) -> dict[str, float]:
    forward = 2 * batch * heads * length * length * head_dim  # 4 B H T^2 d, halved by causality
    return {"fwd_ms": forward, "bwd_ms": 2.5 * forward, "fwd_bwd_ms": 3.5 * forward}


def _difference(x: dict[str, Tensor]) -> float:
    """Relative RMS difference of hybrid and flex_composed outputs: the two compute the same."""
    with torch.no_grad():
        a, b = _hybrid(x)[0](), _flex_composed(x)[0]()
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _row(
    method: str, shape: dict, flops: dict, build: Callable, x: dict, measure: Callable
) -> dict:
    """One method's measurements at one shape; a method that fails in any way (an anchor's
    assertion on its head dim, out of memory, ...) gives a row with its error instead."""
    row = dict(method=method, **shape)
    try:
        measured = measure(*build(x))
    except torch.OutOfMemoryError:
        row["error"] = "out of memory"
    except Exception as e:  # any failure of one method is that method's row
        row["error"] = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"
    else:
        row.update(measured)
        for key, count in flops.items():
            row[key.replace("_ms", "_tflops")] = count / (measured[key] * 1e-3) / 1e12
    return row


def run_benchmark(
    args: argparse.Namespace,
    out: Path | None = None,
    *,
    builders: dict[str, Callable] = BUILDERS,
    make_inputs: Callable | None = None,
    measure: Callable | None = None,
) -> dict:
    """Every method at every shape; the report is rewritten to `out` after every row, so a
    run stopped by a timeout or a kill keeps what it measured."""
    make_inputs = make_inputs or _inputs
    measure = measure or (lambda run, leaves: _measure(run, leaves, args.rep_ms))
    on_cuda = torch.cuda.is_available()
    report = dict(
        device=torch.cuda.get_device_name() if on_cuda else "cpu",
        torch=torch.__version__,
        triton=__import__("triton").__version__,
        python=platform.python_version(),
        dtype="bfloat16",
        date=time.strftime("%Y-%m-%dT%H:%M:%S"),
        args={k: str(v) for k, v in vars(args).items()},
        skipped={},
        results=[],
        cost_model=[],
    )

    def save() -> None:
        if out is not None:
            out.write_text(json.dumps(report, indent=2))

    for method in args.methods:
        if (why := _available(method)) is not None:
            report["skipped"][method] = why
    methods = [m for m in args.methods if m not in report["skipped"]]
    grid = [(t, d) for d in args.head_dims for t in args.lengths]
    for length, head_dim in tqdm(grid, desc="bench.attention"):
        if args.width % head_dim:
            raise SystemExit(f"--width {args.width} is not a multiple of head dim {head_dim}")
        batch, heads = max(1, args.tokens // length), args.width // head_dim
        x = make_inputs(batch, length, heads, head_dim)
        flops = _flops(batch, heads, length, head_dim)
        shape = dict(T=length, d=head_dim, B=batch, HQ=heads, H=heads)
        report["cost_model"].append(cost_summary(CostShape(batch, length, heads, heads, head_dim)))
        if "hybrid" in methods and "flex_composed" in methods and length <= 32768:
            try:
                shape["hybrid_vs_flex_rel_diff"] = _difference(x)
            except Exception as e:  # the comparison is optional, the rows are not
                shape["hybrid_vs_flex_rel_diff"] = f"{type(e).__name__}: {str(e)[:200]}"
        for method in methods:
            report["results"].append(_row(method, shape, flops, builders[method], x, measure))
            save()
            if on_cuda:
                torch.cuda.empty_cache()
        del x
    save()
    return report


def _table(report: dict) -> str:
    """hybrid's times and its forward+backward ratios to the baselines, one line per shape."""
    index = {(r["method"], r["T"], r["d"]): r for r in report["results"]}
    lines = [
        f"{'T':>7} {'d':>4} {'fwd ms':>8} {'bwd ms':>8} {'f+b ms':>8} {'f+b TF/s':>8} "
        f"{'peak MiB':>9} {'skip':>6} {'vs sdpa':>8} {'fa2 alibi':>9} {'fa2 win':>8} "
        f"{'vs flex':>8} {'vs path':>8}"
    ]
    for (method, length, head_dim), row in index.items():
        if method != "hybrid" or "error" in row:
            continue

        def ratio(baseline: str, row=row, length=length, head_dim=head_dim) -> str:
            other = index.get((baseline, length, head_dim))
            if other is None or "error" in other:
                return "-"
            return f"{other['fwd_bwd_ms'] / row['fwd_bwd_ms']:.2f}x"

        lines.append(
            f"{length:>7} {head_dim:>4} {row['fwd_ms']:>8.2f} {row['bwd_ms']:>8.2f} "
            f"{row['fwd_bwd_ms']:>8.2f} {row['fwd_bwd_tflops']:>8.1f} {row['peak_mib']:>9.0f} "
            f"{ratio('hybrid_skip'):>6} {ratio('sdpa_flash'):>8} {ratio('fa2_alibi'):>9} "
            f"{ratio('fa2_window'):>8} {ratio('flex_composed'):>8} {ratio('fla_path'):>8}"
        )
    lines.append(
        "ratios: baseline fwd+bwd time / hybrid's (above 1: hybrid is faster; skip: "
        "hybrid_skip's, below 1 when skipping is faster)"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if not torch.cuda.is_available():
        print(
            "bench.attention needs a CUDA GPU and none is visible (torch.cuda.is_available() is "
            "False). Run `make bench-attention` on a GPU node.",
            file=sys.stderr,
        )
        return 2
    from kernels.hybrid.attention import HEAD_DIMS

    bad = [d for d in args.head_dims if d not in HEAD_DIMS]
    if bad:
        print(f"--head-dims {bad}: the fused kernel has head dims {HEAD_DIMS}", file=sys.stderr)
        return 2
    out = args.out or RESULTS / (
        "attention-"
        + "".join(c if c.isalnum() else "-" for c in torch.cuda.get_device_name()).strip("-")
        + time.strftime("-%Y%m%d-%H%M%S.json")
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    report = run_benchmark(args, out)
    print(_table(report))
    print(cost_table(report["cost_model"]))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
