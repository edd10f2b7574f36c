"""Matmul FLOPs and HBM bytes of the fused hybrid attention, pass by pass, next to
FlashAttention-2's for the same shape: a documented model, no GPU needed.

    .venv/bin/python -m bench.attention_cost            # the 7b shape at 8k, 32k, 128k tokens
    .venv/bin/python -m bench.attention_cost --lengths 8192 --heads 16 --kv-heads 16

The model (FlashAttention's own way of counting IO):
- every tile a program loads or stores crosses HBM once per load or store, with no reuse
  between programs through the L2 cache; an atomic add reads and writes its tile;
- the sequence is a multiple of the tiles, no documents, window or skipping (those only remove
  block pairs, from both kernels alike);
- causal block pairs: a query block visits every key block up to its diagonal, whole tiles;
- the hybrid's forward program serves up to G query heads of a key/value head (fewer rows of
  each, so its diagonal tiles are narrower and each K/V tile is loaded once for them);
- FlashAttention-2 uses the same tiles: the forward runs one program per query block and query
  head, the backward one per key block and query head, adds dq atomically into a float32
  buffer it zeroes first and converts at the end, and with grouped-query heads writes dk, dv
  per query head and sums them over each group.

The hybrid's passes are those of `kernels.hybrid.attention` (its docstring): the angle scan,
rotations of k (and v) before the forward, rotations of q, k (v, dO) before the backward, the
fused dk/dv/dq kernel (dq added atomically), the unrotate pass that also collects dL/dphi, and
the scan's reverse walk. `measure_interpreted` counts the same quantities on the real kernels
in Triton's interpreter (tests/bench/test_attention_cost.py checks the model against it).
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Shape:
    """One attention call: batch, length, query and key/value heads, head dim, bytes per input
    element, the forward's and the backward's (query, key) tiles."""

    B: int
    T: int
    HQ: int
    H: int
    d: int
    element: int = 2  # bfloat16
    fwd_tiles: tuple[int, int] = (128, 64)
    bwd_tiles: tuple[int, int] = (64, 128)
    rotate_values: bool = True
    alibi: bool = True


@dataclass(frozen=True)
class Pass:
    """One kernel (or torch op) of a forward or backward: its matmul FLOPs and HBM bytes."""

    name: str
    phase: str  # "fwd" or "bwd"
    flops: int
    bytes: int
    triton: bool = True  # a Triton kernel of kernels.hybrid (not a torch op, not FA2)


def forward_pairs(T: int, m: int, n: int) -> int:
    """(query block, key block) pairs a forward program per query block visits: key blocks up
    to the one holding the block's last row."""
    return sum(((q + 1) * m - 1) // n + 1 for q in range(T // m))


def backward_pairs(T: int, m: int, n: int) -> int:
    """Pairs a backward program per key block visits: query blocks from the one holding the
    block's first key to the end."""
    return sum(T // m - (k * n) // m for k in range(T // n))


def forward_heads(s: Shape) -> int:
    """Query heads a hybrid forward program serves, fwd_tiles[0] // heads rows each
    (kernels.hybrid.attention.query_heads_per_program): it loads each K/V tile once for all."""
    group = (s.HQ // s.H) & -(s.HQ // s.H)
    return group if s.fwd_tiles[0] // group >= 16 else 1


def hybrid_passes(s: Shape) -> list[Pass]:
    """The passes of `kernels.hybrid_attention` forward and backward (angles by the scan)."""
    e, d, P = s.element, s.d, s.d // 2
    G, rv, slope = s.HQ // s.H, s.rotate_values, 4 * s.alibi
    q_tokens, kv_tokens = s.B * s.T * s.HQ, s.B * s.T * s.H
    rotate = 2 * d * e + 4 * P  # read x and phi, write R(phi) x
    (fm, fn), (bm, bn) = s.fwd_tiles, s.bwd_tiles
    heads = forward_heads(s)
    rows, fwd_slopes = fm // heads, slope if heads == 1 else slope * fm
    fwd_programs = s.B * (s.HQ // heads) * (s.T // rows)
    bwd_programs = s.B * s.H * (s.T // bn)
    fwd_pairs = s.B * (s.HQ // heads) * forward_pairs(s.T, rows, fn)
    bwd_pairs = s.B * s.HQ * backward_pairs(s.T, bm, bn)
    passes = [
        Pass("scan angles", "fwd", 0, kv_tokens * P * 4 * 2),
        Pass("rotate k" + ", v" * rv, "fwd", 0, kv_tokens * rotate * (1 + rv)),
        Pass(
            "attention",
            "fwd",
            fwd_pairs * 2 * (2 * fm * fn * d),
            fwd_programs * (fm * (2 * d * e + 4 * P * (1 + rv) + 4) + fwd_slopes)
            + fwd_pairs * 2 * fn * d * e,
        ),
        Pass("row dot(dO, O)", "bwd", 0, q_tokens * (2 * d * e + 4)),
        Pass("rotate q, k" + ", v, dO" * rv, "bwd", 0, (q_tokens + kv_tokens) * rotate * (1 + rv)),
        Pass("zero dq (torch)", "bwd", 0, q_tokens * 4 * d, triton=False),
        Pass(
            "dk, dv, dq",
            "bwd",
            bwd_pairs * 5 * (2 * bm * bn * d),
            bwd_programs * (2 * bn * d * e + G * slope + bn * d * (4 + (e if not rv else 4)))
            + bwd_pairs * bm * (2 * d * e + 2 * 4 + 2 * 4 * d),
        ),
        Pass(
            "unrotate, dL/dphi",
            "bwd",
            0,
            q_tokens * (2 * d * e + 4 * d + 2 * d * e * rv)
            + kv_tokens * ((2 * d * e + 4 * d) * (1 + rv) + 2 * 4 * P),
        ),
        Pass("scan angles (reverse)", "bwd", 0, kv_tokens * P * 4 * 2),
    ]
    return passes  # without rotated values dv leaves the dk/dv/dq kernel in the input dtype


def fa2_passes(s: Shape) -> list[Pass]:
    """FlashAttention-2's (flash_attn_func, causal, alibi_slopes) for the same shape."""
    e, d, G = s.element, s.d, s.HQ // s.H
    slope = 4 * s.alibi
    q_tokens, kv_tokens = s.B * s.T * s.HQ, s.B * s.T * s.H
    (fm, fn), (bm, bn) = s.fwd_tiles, s.bwd_tiles
    fwd_pairs = s.B * s.HQ * forward_pairs(s.T, fm, fn)
    bwd_pairs = s.B * s.HQ * backward_pairs(s.T, bm, bn)
    fwd_programs, bwd_programs = s.B * s.HQ * (s.T // fm), s.B * s.HQ * (s.T // bn)
    passes = [
        Pass(
            "attention",
            "fwd",
            fwd_pairs * 2 * (2 * fm * fn * d),
            fwd_programs * (fm * (2 * d * e + 4) + slope) + fwd_pairs * 2 * fn * d * e,
            False,
        ),
        Pass("row dot(dO, O), zero dq", "bwd", 0, q_tokens * (2 * d * e + 4 + 4 * d), False),
        Pass(
            "dk, dv, dq",
            "bwd",
            bwd_pairs * 5 * (2 * bm * bn * d),
            bwd_programs * (4 * bn * d * e + slope)
            + bwd_pairs * bm * (2 * d * e + 2 * 4 + 2 * 4 * d),
            False,
        ),
        Pass("dq to input dtype", "bwd", 0, q_tokens * d * (4 + e), False),
    ]
    if G > 1:
        passes.append(
            Pass("sum dk, dv over groups", "bwd", 0, 2 * d * e * (q_tokens + kv_tokens), False)
        )
    return passes


def summary(s: Shape) -> dict:
    """Per phase: the hybrid's and FA2's FLOPs and bytes, and how many T x T x d matmuls over
    the visited tiles the FLOPs are (FlashAttention-2: 2 forward, 5 backward); the hybrid's
    extra bytes as a fraction of FA2's."""
    hybrid, fa2 = hybrid_passes(s), fa2_passes(s)
    (fm, fn), (bm, bn) = s.fwd_tiles, s.bwd_tiles
    heads = forward_heads(s)
    one_matmul = {  # FLOPs of one matmul over every tile each visits
        "fwd": s.B * s.HQ * forward_pairs(s.T, fm // heads, fn) * 2 * (fm // heads) * fn * s.d,
        "fa2_fwd": s.B * s.HQ * forward_pairs(s.T, fm, fn) * 2 * fm * fn * s.d,
        "bwd": s.B * s.HQ * backward_pairs(s.T, bm, bn) * 2 * bm * bn * s.d,
    }
    one_matmul["fa2_bwd"] = one_matmul["bwd"]
    row = {"shape": asdict(s), "passes": [asdict(p) for p in hybrid]}
    row["fa2_passes"] = [asdict(p) for p in fa2]
    for phase in ("fwd", "bwd"):
        for name, passes in (("", hybrid), ("fa2_", fa2)):
            for key in ("flops", "bytes"):
                row[f"{name}{phase}_{key}"] = sum(
                    getattr(p, key) for p in passes if p.phase == phase
                )
            flops = row[f"{name}{phase}_flops"]
            row[f"{name}{phase}_matmuls"] = flops / one_matmul[f"{name}{phase}"]
    both = row["fwd_bytes"] + row["bwd_bytes"]
    fa2_both = row["fa2_fwd_bytes"] + row["fa2_bwd_bytes"]
    row["extra_bytes_vs_fa2"] = (both - fa2_both) / fa2_both
    return row


@contextmanager
def interpreted_traffic():
    """Count, in Triton's interpreter, the matmul FLOPs and the bytes every kernel loads,
    stores and atomically updates (both ways): yields a dict that fills as kernels run."""
    from triton.runtime.interpreter import InterpreterBuilder

    counts = {"flops": 0, "bytes": 0}
    originals = {
        name: getattr(InterpreterBuilder, name)
        for name in ("create_dot", "create_masked_load", "create_masked_store", "create_atomic_rmw")
    }

    def moved(ptrs, mask) -> int:
        return int(mask.data.sum()) * ptrs.get_element_ty().primitive_bitwidth // 8

    def dot(self, a, b, acc, *args):
        counts["flops"] += 2 * a.data.shape[0] * a.data.shape[1] * b.data.shape[1]
        return originals["create_dot"](self, a, b, acc, *args)

    def load(self, ptrs, mask, *args):
        counts["bytes"] += moved(ptrs, mask)
        return originals["create_masked_load"](self, ptrs, mask, *args)

    def store(self, ptrs, value, mask, *args):
        counts["bytes"] += moved(ptrs, mask)
        return originals["create_masked_store"](self, ptrs, value, mask, *args)

    def atomic(self, op, ptrs, value, mask, *args):
        counts["bytes"] += 2 * moved(ptrs, mask)
        return originals["create_atomic_rmw"](self, op, ptrs, value, mask, *args)

    replacements = {
        "create_dot": dot,
        "create_masked_load": load,
        "create_masked_store": store,
        "create_atomic_rmw": atomic,
    }
    try:
        for name, fn in replacements.items():
            setattr(InterpreterBuilder, name, fn)
        yield counts
    finally:
        for name, fn in originals.items():
            setattr(InterpreterBuilder, name, fn)


def table(rows: list[dict]) -> str:
    """One line per `summary` row."""
    lines = [
        f"{'T':>7} {'HQ/H':>6} {'d':>4} {'fwd GB':>7} {'FA2':>7} {'bwd GB':>7} {'FA2':>7} "
        f"{'extra':>6} {'bwd matmuls':>11} {'FA2':>4}"
    ]
    for r in rows:
        s = r["shape"]
        lines.append(
            f"{s['T']:>7} {s['HQ']:>3}/{s['H']:<2} {s['d']:>4} {r['fwd_bytes'] / 1e9:>7.2f} "
            f"{r['fa2_fwd_bytes'] / 1e9:>7.2f} {r['bwd_bytes'] / 1e9:>7.2f} "
            f"{r['fa2_bwd_bytes'] / 1e9:>7.2f} {r['extra_bytes_vs_fa2']:>6.1%} "
            f"{r['bwd_matmuls']:>11.0f} {r['fa2_bwd_matmuls']:>4.0f}"
        )
    lines.append(
        "per layer. extra: the hybrid's forward + backward bytes above FA2's, as a fraction of "
        "FA2's. matmuls: T x T x d matmuls over the causal tiles (each 2 B HQ d T^2 / 2 FLOPs "
        "but for the diagonal tiles' waste, which both share)"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 131072])
    parser.add_argument("--heads", type=int, default=32, help="query heads (7b: 32)")
    parser.add_argument("--kv-heads", type=int, default=8, help="key/value heads (7b: 8)")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--out", type=Path, default=RESULTS / "attention_cost.json")
    args = parser.parse_args(argv)
    bad = [t for t in args.lengths if t % 128]
    if bad or args.heads % args.kv_heads:
        print(
            f"lengths must be multiples of 128 (got {bad}) and --heads a multiple of "
            f"--kv-heads ({args.heads}, {args.kv_heads})",
            file=sys.stderr,
        )
        return 2
    rows = [summary(Shape(1, t, args.heads, args.kv_heads, args.head_dim)) for t in args.lengths]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1))
    print(table(rows))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
