"""Chunkwise scan of the accumulated angles in Triton: the GPU counterpart of `kernels.angles`.

phi_t is the inclusive prefix sum of the increments delta over t's document. One program owns
a (batch row, head, 16 pairs) column and walks the sequence in chunks of CHUNK tokens, carrying
the running sum from chunk to chunk. Everything inside the kernel is float64: the chunk's prefix
sums, the restart at document starts (subtract the prefix sum just before the start), the carry,
and its reduction mod 2*pi. The stored float32 phi lies in [0, 2*pi), within half a float32 ulp
of 2*pi (2.4e-7 rad) of the exact angle mod 2*pi at any length: ahead of docs/design.md's 1e-4 rad,
and of the float32-chunk scheme of `kernels.angles` it agrees with. As no sum is float32, the
chunk length sets only how much work each sequential step does, not the precision.

The gradient is the same walk backwards: dL/ddelta_s is the sum of dL/dphi_t over t >= s in
s's document (a float64 carry, no reduction: gradients are not periodic).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.angles import TWO_PI

_TWO_PI = tl.constexpr(TWO_PI)
CHUNK = 128
BLOCK_P = 16  # pairs per program: P / 16 programs per (row, head) run side by side


@triton.jit
def _scan_kernel(
    X,
    Y,
    BOUNDS,
    T,
    H,
    P,
    sx_b,
    sx_t,
    sx_h,
    sy_b,
    sy_t,
    sy_h,
    sb_b,
    CHUNK: tl.constexpr,
    BLOCK_P: tl.constexpr,
    REVERSE: tl.constexpr,
    DOCS: tl.constexpr,
):
    """Forward: Y_t = sum of X_s over starts_t <= s <= t, reduced mod 2*pi.
    REVERSE: Y_t = sum of X_s over t <= s < ends_t. BOUNDS: the starts, or the ends (REVERSE).
    """
    b = (tl.program_id(1) // H).to(tl.int64)
    h = tl.program_id(1) % H
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = p < P
    rows = tl.arange(0, CHUNK)
    x_base = X + b * sx_b + h * sx_h
    y_base = Y + b * sy_b + h * sy_h
    carry = tl.zeros([BLOCK_P], dtype=tl.float64)
    n_chunks = tl.cdiv(T, CHUNK)
    for c in range(n_chunks):
        lo = (n_chunks - 1 - c) * CHUNK if REVERSE else c * CHUNK
        t = lo + rows
        t_ok = t < T
        mask = t_ok[:, None] & p_ok[None, :]
        x = tl.load(x_base + t[:, None].to(tl.int64) * sx_t + p[None, :], mask=mask, other=0.0)
        x = x.to(tl.float64)
        if REVERSE:
            if DOCS:
                bound = tl.load(BOUNDS + b * sb_b + t, mask=t_ok, other=T)
            else:
                bound = tl.full([CHUNK], T, tl.int32)
            run = tl.cumsum(x, axis=0, reverse=True)  # sums over s >= t within the chunk
            # t's document ends inside the chunk: drop the sum from its end on; after it: carry.
            ends_inside = bound < lo + CHUNK
            cut_at = tl.minimum(tl.maximum(bound - lo, 0), CHUNK - 1)
            takes_carry = bound > lo + CHUNK
            edge_row = 0
        else:
            if DOCS:
                bound = tl.load(BOUNDS + b * sb_b + t, mask=t_ok, other=0)
            else:
                bound = tl.zeros([CHUNK], tl.int32)
            run = tl.cumsum(x, axis=0)  # sums over s <= t within the chunk
            # t's document starts inside the chunk: drop the sum before it; before it: carry.
            ends_inside = bound > lo
            cut_at = tl.minimum(tl.maximum(bound - 1 - lo, 0), CHUNK - 1)
            takes_carry = bound < lo
            edge_row = CHUNK - 1
        cut = tl.gather(run, tl.broadcast_to(cut_at[:, None], (CHUNK, BLOCK_P)), axis=0)
        y = run - tl.where(ends_inside[:, None], cut, 0.0)
        y = y + tl.where(takes_carry[:, None], carry[None, :], 0.0)
        if not REVERSE:
            y = y - _TWO_PI * tl.floor(y / _TWO_PI)
        tl.store(y_base + t[:, None].to(tl.int64) * sy_t + p[None, :], y, mask=mask)
        carry = tl.sum(tl.where(rows[:, None] == edge_row, y, 0.0), axis=0)


def _scan(x: Tensor, bounds: Tensor | None, *, reverse: bool) -> Tensor:
    """Launch the scan over x [B, T, H, P]; returns float32 (at least) of x's shape."""
    B, T, H, P = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    y = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
    grid = (triton.cdiv(P, BLOCK_P), B * H)
    _scan_kernel[grid](
        x,
        y,
        x if bounds is None else bounds,
        T,
        H,
        P,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        y.stride(0),
        y.stride(1),
        y.stride(2),
        0 if bounds is None else bounds.stride(0),
        CHUNK=CHUNK,
        BLOCK_P=BLOCK_P,
        REVERSE=reverse,
        DOCS=bounds is not None,
    )
    return y


class _AngleScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, delta, starts, ends):
        ctx.save_for_backward(ends)
        ctx.delta_dtype = delta.dtype
        return _scan(delta, starts, reverse=False)

    @staticmethod
    def backward(ctx, dphi):
        (ends,) = ctx.saved_tensors
        return _scan(dphi, ends, reverse=True).to(ctx.delta_dtype), None, None


def scan_angles(delta: Tensor, starts: Tensor | None = None, ends: Tensor | None = None) -> Tensor:
    """phi = inclusive prefix sum of delta [B, T, H, P] over each document, reduced as
    `kernels.angles.accumulate_angles` does; differentiable (the gradient is the reverse scan).

    starts, ends: int32 [B, T] document bounds (`kernels.hybrid.documents`), both or neither.
    Returns float32 (float64 for float64 delta) on delta's device.
    """
    if (starts is None) != (ends is None):
        raise ValueError("scan_angles needs both document starts and ends, or neither")
    if starts is not None:  # the kernel reads them at unit stride along T
        starts, ends = starts.contiguous(), ends.contiguous()
    return _AngleScan.apply(delta, starts, ends)
