"""Chunk-parallel scan of the accumulated angles in Triton: the GPU counterpart of `kernels.angles`.

phi_t is the inclusive prefix sum of the increments delta over t's document. The sequence is cut
into chunks of CHUNK tokens, and every (chunk, 16 pairs, batch row x head) tile is a program of
its own, so the grid grows with T (`scan_grid`). Three passes:

1. `_scan_kernel` (CARRIED=False): each chunk's own sum up to its edge (its last token; the
   first in reverse), restarted at document starts inside the chunk, into a float64 [B, n, H, P].
2. `_carries`: the carry into each chunk, a segmented scan of those sums over the chunks
   (restarting at every chunk whose edge token's document begins inside it), in float64.
3. `_scan_kernel` (CARRIED=True): each chunk's prefix sums plus its carry, for the tokens whose
   document begins before the chunk.

Every sum is float64: the chunk's prefix sums, the restart at document starts (subtract the
prefix sum just before the start), the carries and the reduction mod 2*pi. The stored float32 phi
lies in [0, 2*pi), within half a float32 ulp of 2*pi (2.4e-7 rad) of the exact angle mod 2*pi at
any length (the float64 carries' own error is below 1e-10 rad at T = 131072): ahead of
docs/design.md's 1e-4 rad, and of the float32-chunk scheme of `kernels.angles` it agrees with.
As no sum is float32, the chunk length sets only the work per program, not the precision.

The gradient is the same scan backwards: dL/ddelta_s is the sum of dL/dphi_t over t >= s in
s's document (float64 carries, no reduction: gradients are not periodic).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.angles import TWO_PI

_TWO_PI = tl.constexpr(TWO_PI)
CHUNK = 128
BLOCK_P = 16  # pairs per program


@triton.jit
def _scan_kernel(
    X,
    Y,
    BOUNDS,
    CARRY,
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
    CARRIED: tl.constexpr,
):
    """One chunk's sums. Forward: Y_t = sum of X_s over max(starts_t, chunk start) <= s <= t
    (+ the carry CARRY[b, c, h, p] where starts_t precedes the chunk), reduced mod 2*pi.
    REVERSE: the sums over t <= s < min(ends_t, chunk end). BOUNDS: the starts, or the ends
    (REVERSE). Without CARRIED, only the edge token's sum (its last token's; the first's in
    REVERSE) is written, to CARRY [B, n, H, P].
    """
    c = tl.program_id(0)
    p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    b = (tl.program_id(2) // H).to(tl.int64)
    h = tl.program_id(2) % H
    p_ok = p < P
    lo = c * CHUNK
    t = lo + tl.arange(0, CHUNK)
    t_ok = t < T
    mask = t_ok[:, None] & p_ok[None, :]
    x_base = X + b * sx_b + h * sx_h
    x = tl.load(x_base + t[:, None].to(tl.int64) * sx_t + p[None, :], mask=mask, other=0.0)
    x = x.to(tl.float64)
    # CARRY is a contiguous float64 [B, n, H, P].
    carry_ptr = CARRY + ((b * tl.num_programs(0) + c) * H + h) * P + p
    if not CARRIED:
        # The edge token's sum: the chunk's rows in its document.
        if REVERSE:
            edge_bound = T
            if DOCS:
                edge_bound = tl.load(BOUNDS + b * sb_b + lo)
            inside = t < edge_bound
        else:
            edge_bound = 0
            if DOCS:
                edge_bound = tl.load(BOUNDS + b * sb_b + tl.minimum(lo + CHUNK, T) - 1)
            inside = t >= edge_bound
        tl.store(carry_ptr, tl.sum(tl.where(inside[:, None], x, 0.0), axis=0), mask=p_ok)
    else:
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
        cut = tl.gather(run, tl.broadcast_to(cut_at[:, None], (CHUNK, BLOCK_P)), axis=0)
        y = run - tl.where(ends_inside[:, None], cut, 0.0)
        carry = tl.load(carry_ptr, mask=p_ok, other=0.0)
        y = y + tl.where(takes_carry[:, None], carry[None, :], 0.0)
        if not REVERSE:
            y = y - _TWO_PI * tl.floor(y / _TWO_PI)
        y_base = Y + b * sy_b + h * sy_h
        tl.store(y_base + t[:, None].to(tl.int64) * sy_t + p[None, :], y, mask=mask)


def scan_grid(batch: int, length: int, heads: int, pairs: int) -> tuple[int, int, int]:
    """The launch grid of both kernel passes over x [B, T, H, P]: (chunks, pair blocks, B x H)."""
    return triton.cdiv(length, CHUNK), triton.cdiv(pairs, BLOCK_P), batch * heads


def _carries(sums: Tensor, bounds: Tensor | None, length: int, *, reverse: bool) -> Tensor:
    """The float64 carry into each chunk from the chunks' edge sums [B, n, H, P]: the sum over
    the chunks before it (after it: reverse) back to the one where its edge token's document
    begins (ends). Forward carries are reduced mod 2*pi."""
    B, n = sums.shape[:2]
    chunk = torch.arange(n, device=sums.device)
    lo = chunk * CHUNK
    if bounds is None:
        restarts = torch.zeros(B, n, dtype=torch.bool, device=sums.device)
    elif reverse:  # the first token's document ends inside the chunk
        restarts = bounds[:, lo] <= lo + CHUNK
    else:  # the last token's document starts inside the chunk
        restarts = bounds[:, (lo + CHUNK - 1).clamp(max=length - 1)] >= lo
    if reverse:
        sums, restarts = sums.flip(1), restarts.flip(1)
    # Segmented inclusive scan: out_c = S_c - S_{r - 1}, r the last restart at or before c.
    total = sums.cumsum(dim=1)
    last = torch.where(restarts, chunk, -1).cummax(dim=1).values
    before = (last - 1)[..., None, None].expand_as(total)
    out = total - torch.where(before >= 0, total.gather(1, before.clamp(min=0)), 0.0)
    carry = torch.nn.functional.pad(out[:, :-1], (0, 0, 0, 0, 1, 0))  # exclusive
    if reverse:
        return carry.flip(1).contiguous()
    return carry.remainder(TWO_PI)


def _scan(x: Tensor, bounds: Tensor | None, *, reverse: bool) -> Tensor:
    """Launch the three passes over x [B, T, H, P]; returns float32 (at least) of x's shape."""
    B, T, H, P = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    y = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
    grid = scan_grid(B, T, H, P)
    sums = torch.empty(B, grid[0], H, P, dtype=torch.float64, device=x.device)

    def launch(carry: Tensor, carried: bool) -> None:
        _scan_kernel[grid](
            x,
            y,
            x if bounds is None else bounds,
            carry,
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
            CARRIED=carried,
        )

    launch(sums, carried=False)
    launch(_carries(sums, bounds, T, reverse=reverse), carried=True)
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
