"""Fused hybrid attention in Triton: accumulated rotations of q, k, v, ALiBi, causal mask,
sliding window and packed documents, flash-attention style (online softmax, O(T) memory).

Semantics (docs/design.md; `kernels.reference.reference_attention` is the definition):
    s_ij = (R(phi_i) q_i) . (R(phi_j) k_j) * scale - m_h (i - j),  j <= i, same document,
           and i - j < window when a window is given
    o_i  = R(-phi_i) sum_j softmax_j(s_ij) R(phi_j) v_j    (rotate_values; else sum_j a_ij v_j)

Forward. One elementwise pass rotates k and v once per token (rotating them inside the
attention loop would redo the cos/sin for every query block). The attention kernel rotates its
query block in the prologue, runs the online softmax over the key blocks with the ALiBi bias
computed from the slopes and the token indices, and back-rotates the output in the epilogue.
Keys are visited in three runs: blocks that straddle the first visible key (document start,
window edge or skipping bound) of some row, blocks that need no mask at all, and the diagonal
blocks; only the first and last runs evaluate masks. Grouped-query heads: query head hq reads
key/value head hq // G. Skipping (skip_eps with ALiBi) is a per-token bound on the first
visible key of each query and head (`kernels.alibi_reach.alibi_bounds`), fixed before any
kernel runs and read like the document starts, so every kernel sums over the same pairs.

Backward, flash-attention 2 style with recomputation from the saved log-sum-exp: q, k, v and
dO are rotated (elementwise passes; the forward saves k and v unrotated, at no extra memory),
then one kernel per key block accumulates dk~, dv~ over the G query heads of its key/value
head and adds each query block's share of dq~ atomically (five matmuls per pair of blocks,
as FlashAttention-2; float32 atomics make dq's last bits depend on the order the GPU adds
them in). Deterministic mode: pinned tiles, and dq~ from its own kernel, one program per query
block summing its key blocks in order (seven matmuls per pair of blocks, no atomics). A last
elementwise pass rotates the gradients back (dx = R(-phi) dx~) and collects
dL/dphi_t = sum over x in (q, k, v) of x_1 dx_2 - x_2 dx_1, minus o_1 dO_2 - o_2 dO_1 for the
output's back-rotation (pairs (x_1, x_2) = (x[p], x[p + d/2]); v and o only when rotated).

Precision: angles are reduced mod 2*pi before cos/sin and rotations run in float32; scores,
softmax statistics and gradient accumulators are float32; float32 inputs use IEEE float32 dot
products (not TF32), bfloat16/float16 inputs the tensor cores' native precision.
"""

from __future__ import annotations

import functools
import json
import math
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.alibi_reach import alibi_bounds
from kernels.hybrid.documents import cu_seqlens_bounds
from kernels.hybrid.scan import scan_angles

LOG2E = math.log2(math.e)  # scores are kept in log2 units, for exp2
_LOG2E = tl.constexpr(LOG2E)
_TWO_PI = tl.constexpr(2 * math.pi)
_NEG_BIG = tl.constexpr(-1.0e30)  # running-max start: finite, so fully masked blocks give no NaN
HEAD_DIMS = (32, 64, 128)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INTERPRETING = triton.knobs.runtime.interpret


# ----------------------------------------------------------------------------------------------
# Rotation helpers (half-split pairs: x_1 = x[:P], x_2 = x[P:], P = D / 2)
# ----------------------------------------------------------------------------------------------


@triton.jit
def _load_halves(base, t, t_ok, stride_t, P: tl.constexpr):
    """(x[t, :P], x[t, P:]) in float32, [len(t), P] each."""
    offs = t[:, None].to(tl.int64) * stride_t + tl.arange(0, P)[None, :]
    x1 = tl.load(base + offs, mask=t_ok[:, None], other=0.0).to(tl.float32)
    x2 = tl.load(base + offs + P, mask=t_ok[:, None], other=0.0).to(tl.float32)
    return x1, x2


@triton.jit
def _store_halves(base, t, t_ok, stride_t, x1, x2, P: tl.constexpr):
    offs = t[:, None].to(tl.int64) * stride_t + tl.arange(0, P)[None, :]
    tl.store(base + offs, x1.to(base.dtype.element_ty), mask=t_ok[:, None])
    tl.store(base + offs + P, x2.to(base.dtype.element_ty), mask=t_ok[:, None])


@triton.jit
def _cos_sin(base, t, t_ok, stride_t, P: tl.constexpr):
    """cos and sin (float32 [len(t), P]) of the angles at rows t, reduced mod 2*pi first."""
    offs = t[:, None].to(tl.int64) * stride_t + tl.arange(0, P)[None, :]
    phi = tl.load(base + offs, mask=t_ok[:, None], other=0.0)
    phi = (phi - _TWO_PI * tl.floor(phi / _TWO_PI)).to(tl.float32)
    return tl.cos(phi), tl.sin(phi)


@triton.jit
def _rotate_kernel(
    X,
    PHI,
    Y,
    sx_b,
    sx_t,
    sx_h,
    sp_b,
    sp_t,
    sp_h,
    sy_b,
    sy_t,
    sy_h,
    T,
    HX,
    GX,
    D: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """Y = R(phi) X for X [B, T, HX, D]; head hx turns by the angles of head hx // GX."""
    P: tl.constexpr = D // 2
    b = (tl.program_id(1) // HX).to(tl.int64)
    hx = tl.program_id(1) % HX
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < T
    x1, x2 = _load_halves(X + b * sx_b + hx * sx_h, t, t_ok, sx_t, P)
    c, s = _cos_sin(PHI + b * sp_b + (hx // GX) * sp_h, t, t_ok, sp_t, P)
    _store_halves(Y + b * sy_b + hx * sy_h, t, t_ok, sy_t, x1 * c - x2 * s, x1 * s + x2 * c, P)


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------


@triton.jit
def _log2_slope(SLOPES, hq, ALIBI: tl.constexpr):
    """Head hq's ALiBi slope in log2 units."""
    return tl.load(SLOPES + hq) * _LOG2E if ALIBI else 0.0


@triton.jit
def _logits_masked(s, i, j, starts_i, window, BOUNDED: tl.constexpr, WINDOW: tl.constexpr):
    """Mask scores s [len(i), len(j)] to starts_i <= j <= i and i - j < window."""
    keep = j[None, :] <= i[:, None]
    if BOUNDED:
        keep = keep & (j[None, :] >= starts_i[:, None])
    if WINDOW:
        keep = keep & ((i[:, None] - j[None, :]) < window)
    return tl.where(keep, s, float("-inf"))


@triton.jit
def _fwd_block(
    q1,
    q2,
    acc1,
    acc2,
    m,
    l,
    k_base,
    v_base,
    sk_t,
    sv_t,
    j0,
    i,
    starts_i,
    slope2,
    qk_scale2,
    T,
    window,
    P: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    ALIBI: tl.constexpr,
    BOUNDED: tl.constexpr,
    WINDOW: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Fold key block j0 into the online softmax of the query block (scores in log2 units)."""
    j = j0 + tl.arange(0, BLOCK_N)
    j_ok = j < T
    pairs = tl.arange(0, P)
    k_offs = j[None, :].to(tl.int64) * sk_t + pairs[:, None]  # [P, BLOCK_N]: k transposed
    k1 = tl.load(k_base + k_offs, mask=j_ok[None, :], other=0.0)
    k2 = tl.load(k_base + k_offs + P, mask=j_ok[None, :], other=0.0)
    s = tl.dot(q1, k1, input_precision=PRECISION)
    s = tl.dot(q2, k2, s, input_precision=PRECISION) * qk_scale2
    if ALIBI:
        s = s - slope2[:, None] * (i[:, None] - j[None, :]).to(tl.float32)
    if MASKED:
        s = _logits_masked(s, i, j, starts_i, window, BOUNDED, WINDOW)
    m_new = tl.maximum(m, tl.max(s, 1))
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(s - m_new[:, None])
    l = l * alpha + tl.sum(p, 1)
    v_offs = j[:, None].to(tl.int64) * sv_t + pairs[None, :]
    v1 = tl.load(v_base + v_offs, mask=j_ok[:, None], other=0.0)
    v2 = tl.load(v_base + v_offs + P, mask=j_ok[:, None], other=0.0)
    p = p.to(v1.dtype)
    acc1 = tl.dot(p, v1, acc1 * alpha[:, None], input_precision=PRECISION)
    acc2 = tl.dot(p, v2, acc2 * alpha[:, None], input_precision=PRECISION)
    return acc1, acc2, m_new, l


@triton.jit
def _row_starts(starts_base, i, i_ok, BLOCK_M: tl.constexpr, BOUNDED: tl.constexpr):
    """The first visible key of each row i (document start or skipping bound; 0 unbounded)."""
    if BOUNDED:
        return tl.load(starts_base + i, mask=i_ok, other=0)
    return tl.zeros([BLOCK_M], tl.int32)


@triton.jit
def _key_range(
    starts_i,
    i_ok,
    i0,
    i_last,
    window,
    BLOCK_N: tl.constexpr,
    WINDOW: tl.constexpr,
):
    """Key-block starts lo <= a <= b <= hi for query rows i0..i_last (of one or several heads)
    whose first visible keys are starts_i: blocks in [a, b) need no mask, those in [lo, a) and
    [b, hi) do."""
    lo = tl.min(tl.where(i_ok, starts_i, i_last), 0)
    full_from = tl.max(tl.where(i_ok, starts_i, 0), 0)
    if WINDOW:
        lo = tl.maximum(lo, i0 - window + 1)
        full_from = tl.maximum(full_from, i_last - window + 1)
    lo = (lo // BLOCK_N) * BLOCK_N
    hi = i_last + 1
    b_mid = tl.minimum(tl.maximum(((i0 + 1) // BLOCK_N) * BLOCK_N, lo), hi)
    a_mid = tl.minimum(tl.maximum(tl.cdiv(full_from, BLOCK_N) * BLOCK_N, lo), b_mid)
    return lo, a_mid, b_mid, hi


@triton.jit
def _fwd_kernel(
    Q,
    K,
    V,
    PHI,
    SLOPES,
    STARTS,
    O,
    LSE,
    sq_b,
    sq_t,
    sq_h,
    sk_b,
    sk_t,
    sk_h,
    sv_b,
    sv_t,
    sv_h,
    sp_b,
    sp_t,
    sp_h,
    so_b,
    so_t,
    so_h,
    sd_b,
    sd_h,
    T,
    HQ,
    G,
    qk_scale2,
    window,
    T_BUCKET,  # the autotuner's key: T rounded up to a power of two (unused in the kernel)
    D: tl.constexpr,
    ROTATE: tl.constexpr,
    ROTATE_V: tl.constexpr,
    ALIBI: tl.constexpr,
    DOCS: tl.constexpr,
    WINDOW: tl.constexpr,
    SKIP: tl.constexpr,
    PRECISION: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    P: tl.constexpr = D // 2
    # GROUP query heads of one key/value head per program, ROWS query positions each: every
    # K/V block is loaded once for all of them (at least 16 rows a head, as tl.dot needs).
    ROWS: tl.constexpr = BLOCK_M // GROUP if BLOCK_M // GROUP >= 16 else BLOCK_M
    HEADS: tl.constexpr = BLOCK_M // ROWS
    b = (tl.program_id(1) // (HQ // HEADS)).to(tl.int64)
    hq0 = (tl.program_id(1) % (HQ // HEADS)) * HEADS
    h = hq0 // G
    r = tl.arange(0, BLOCK_M)
    hq = hq0 + r // ROWS  # each row's query head
    i0 = (tl.num_programs(0) - 1 - tl.program_id(0)) * ROWS  # longest rows first
    i = i0 + r % ROWS
    i_ok = i < T
    i_last = tl.minimum(i0 + ROWS, T) - 1
    pairs = tl.arange(0, P)[None, :]
    q_offs = hq[:, None].to(tl.int64) * sq_h + i[:, None].to(tl.int64) * sq_t + pairs
    q1 = tl.load(Q + b * sq_b + q_offs, mask=i_ok[:, None], other=0.0).to(tl.float32)
    q2 = tl.load(Q + b * sq_b + q_offs + P, mask=i_ok[:, None], other=0.0).to(tl.float32)
    phi_base = PHI + b * sp_b + h * sp_h
    if ROTATE:  # prologue: q~ = R(phi_i) q
        c, s = _cos_sin(phi_base, i, i_ok, sp_t, P)
        q1, q2 = q1 * c - q2 * s, q1 * s + q2 * c
    q1 = q1.to(Q.dtype.element_ty)
    q2 = q2.to(Q.dtype.element_ty)
    slope2 = tl.zeros([BLOCK_M], tl.float32)
    if ALIBI:
        if HEADS == 1:
            slope2 += tl.load(SLOPES + hq0) * _LOG2E
        else:
            slope2 = tl.load(SLOPES + hq) * _LOG2E
    starts_i = _row_starts(STARTS + b * sd_b + hq * sd_h, i, i_ok, BLOCK_M, DOCS or SKIP)
    lo, a_mid, b_mid, hi = _key_range(starts_i, i_ok, i0, i_last, window, BLOCK_N, WINDOW)
    k_base = K + b * sk_b + h * sk_h
    v_base = V + b * sv_b + h * sv_h
    m = tl.full([BLOCK_M], _NEG_BIG, tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc1 = tl.zeros([BLOCK_M, P], tl.float32)
    acc2 = tl.zeros([BLOCK_M, P], tl.float32)
    for j0 in range(lo, a_mid, BLOCK_N):
        acc1, acc2, m, l = _fwd_block(
            q1, q2, acc1, acc2, m, l, k_base, v_base, sk_t, sv_t, j0, i, starts_i, slope2,
            qk_scale2, T, window, P, BLOCK_N, True, ALIBI, DOCS or SKIP, WINDOW, PRECISION,
        )  # fmt: skip
    for j0 in range(a_mid, b_mid, BLOCK_N):
        acc1, acc2, m, l = _fwd_block(
            q1, q2, acc1, acc2, m, l, k_base, v_base, sk_t, sv_t, j0, i, starts_i, slope2,
            qk_scale2, T, window, P, BLOCK_N, False, ALIBI, DOCS or SKIP, WINDOW, PRECISION,
        )  # fmt: skip
    for j0 in range(b_mid, hi, BLOCK_N):
        acc1, acc2, m, l = _fwd_block(
            q1, q2, acc1, acc2, m, l, k_base, v_base, sk_t, sv_t, j0, i, starts_i, slope2,
            qk_scale2, T, window, P, BLOCK_N, True, ALIBI, DOCS or SKIP, WINDOW, PRECISION,
        )  # fmt: skip
    acc1 = acc1 / l[:, None]
    acc2 = acc2 / l[:, None]
    if ROTATE_V:  # epilogue: o = R(-phi_i) o~
        c, s = _cos_sin(phi_base, i, i_ok, sp_t, P)
        acc1, acc2 = acc1 * c + acc2 * s, acc2 * c - acc1 * s
    o_offs = hq[:, None].to(tl.int64) * so_h + i[:, None].to(tl.int64) * so_t + pairs
    tl.store(O + b * so_b + o_offs, acc1.to(O.dtype.element_ty), mask=i_ok[:, None])
    tl.store(O + b * so_b + o_offs + P, acc2.to(O.dtype.element_ty), mask=i_ok[:, None])
    tl.store(LSE + (b * HQ + hq) * T + i, m + tl.log2(l), mask=i_ok)


# ----------------------------------------------------------------------------------------------
# Backward (all on rotated tensors x~ = R(phi) x)
# ----------------------------------------------------------------------------------------------


@triton.jit
def _row_dot_kernel(
    O, DO, OUT, so_b, so_t, so_h, sd_b, sd_t, sd_h, T, HQ, D: tl.constexpr, BLOCK_T: tl.constexpr
):
    """OUT[b, hq, t] = o . dO (float32): rowsum(dO * O) of the softmax backward."""
    bh = tl.program_id(1)
    b = (bh // HQ).to(tl.int64)
    hq = bh % HQ
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < T
    d = tl.arange(0, D)
    o = tl.load(O + b * so_b + hq * so_h + t[:, None].to(tl.int64) * so_t + d[None, :],
                mask=t_ok[:, None], other=0.0)  # fmt: skip
    do = tl.load(DO + b * sd_b + hq * sd_h + t[:, None].to(tl.int64) * sd_t + d[None, :],
                 mask=t_ok[:, None], other=0.0)  # fmt: skip
    row = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(OUT + bh.to(tl.int64) * T + t, row, mask=t_ok)


@triton.jit
def _dkdv_block(
    dk,
    dv,
    k,
    v,
    q_base,
    do_base,
    lse_base,
    delta_base,
    starts_base,
    dq_base,
    s_t,
    sdq_t,
    i0,
    j,
    slope2,
    qk_scale2,
    scale,
    T,
    window,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    MASKED: tl.constexpr,
    ALIBI: tl.constexpr,
    BOUNDED: tl.constexpr,
    WINDOW: tl.constexpr,
    PRECISION: tl.constexpr,
    DQ_ATOMIC: tl.constexpr,
):
    """Add query block i0's contribution to dk~, dv~ of the key block j ([BLOCK_N, D] each);
    with DQ_ATOMIC, also the key block's contribution to the query block's dq~ (atomically:
    other key blocks add theirs concurrently, in an order the GPU picks)."""
    i = i0 + tl.arange(0, BLOCK_M)
    i_ok = i < T
    offs = i[:, None].to(tl.int64) * s_t + tl.arange(0, D)[None, :]
    q = tl.load(q_base + offs, mask=i_ok[:, None], other=0.0)
    do = tl.load(do_base + offs, mask=i_ok[:, None], other=0.0)
    lse = tl.load(lse_base + i, mask=i_ok, other=0.0)
    delta = tl.load(delta_base + i, mask=i_ok, other=0.0)
    s = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale2  # [BLOCK_N, BLOCK_M]
    if ALIBI:
        s = s - slope2 * (i[None, :] - j[:, None]).to(tl.float32)
    p = tl.exp2(s - lse[None, :])
    if MASKED:
        keep = (j[:, None] <= i[None, :]) & i_ok[None, :]
        if BOUNDED:
            starts_i = tl.load(starts_base + i, mask=i_ok, other=0)
            keep = keep & (starts_i[None, :] <= j[:, None])
        if WINDOW:
            keep = keep & ((i[None, :] - j[:, None]) < window)
        p = tl.where(keep, p, 0.0)
    dv = tl.dot(p.to(do.dtype), do, dv, input_precision=PRECISION)
    dp = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    ds = p * (dp - delta[None, :])
    dk = tl.dot(ds.to(q.dtype), q, dk, input_precision=PRECISION)
    if DQ_ATOMIC:
        dq = tl.dot(tl.trans(ds).to(k.dtype), k, input_precision=PRECISION) * scale
        offs_dq = i[:, None].to(tl.int64) * sdq_t + tl.arange(0, D)[None, :]
        tl.atomic_add(dq_base + offs_dq, dq, mask=i_ok[:, None], sem="relaxed")
    return dk, dv


@triton.jit
def _dkdv_kernel(
    QR,
    K,
    V,
    DOR,
    LSE,
    DELTA,
    SLOPES,
    STARTS,
    ENDS,
    DQ,
    DK,
    DV,
    sq_b,
    sq_t,
    sq_h,
    sk_b,
    sk_t,
    sk_h,
    sv_b,
    sv_t,
    sv_h,
    sdq_b,
    sdq_t,
    sdq_h,
    sg_b,
    sg_t,
    sg_h,
    sd_b,
    sd_h,
    T,
    H,
    G,
    qk_scale2,
    scale,
    window,
    T_BUCKET,  # the autotuner's key: T rounded up to a power of two (unused in the kernel)
    D: tl.constexpr,
    ALIBI: tl.constexpr,
    DOCS: tl.constexpr,
    WINDOW: tl.constexpr,
    SKIP: tl.constexpr,
    PRECISION: tl.constexpr,
    DQ_ATOMIC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dk~, dv~ (float32) of one key block, summed over the G query heads that read it; with
    DQ_ATOMIC its contributions to those heads' dq~ too (float32, added atomically into DQ).
    STARTS and ENDS (with DOCS or SKIP) bound the queries that see each key: j <= i < ends_j."""
    b = (tl.program_id(1) // H).to(tl.int64)
    h = tl.program_id(1) % H
    j0 = tl.program_id(0) * BLOCK_N
    j = j0 + tl.arange(0, BLOCK_N)
    j_ok = j < T
    j_last = tl.minimum(j0 + BLOCK_N, T) - 1
    offs_k = j[:, None].to(tl.int64) * sk_t + tl.arange(0, D)[None, :]
    offs_v = j[:, None].to(tl.int64) * sv_t + tl.arange(0, D)[None, :]
    k = tl.load(K + b * sk_b + h * sk_h + offs_k, mask=j_ok[:, None], other=0.0)
    v = tl.load(V + b * sv_b + h * sv_h + offs_v, mask=j_ok[:, None], other=0.0)
    lo = (j0 // BLOCK_M) * BLOCK_M
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)
    for g in range(G):
        hq = h * G + g
        slope2 = _log2_slope(SLOPES, hq, ALIBI)
        q_base = QR + b * sq_b + hq * sq_h
        do_base = DOR + b * sq_b + hq * sq_h
        dq_base = DQ + b * sdq_b + hq * sdq_h
        row_base = (b * (H * G) + hq) * T
        starts_base = STARTS + b * sd_b + hq * sd_h
        # Query blocks lo <= a <= b <= hi: those in [a, b) see every key of the block unmasked.
        hi = T + j0 * 0
        full_to = T + j0 * 0
        if DOCS or SKIP:
            hi = tl.load(ENDS + b * sd_b + hq * sd_h + j_last)
            full_to = tl.load(ENDS + b * sd_b + hq * sd_h + j0)
        if WINDOW:
            hi = tl.minimum(hi, j_last + window)
            full_to = tl.minimum(full_to, j0 + window)
        a_mid = tl.minimum(tl.maximum(tl.cdiv(j_last, BLOCK_M) * BLOCK_M, lo), hi)
        b_mid = tl.minimum(tl.maximum((full_to // BLOCK_M) * BLOCK_M, a_mid), hi)
        for i0 in range(lo, a_mid, BLOCK_M):
            dk, dv = _dkdv_block(
                dk, dv, k, v, q_base, do_base, LSE + row_base, DELTA + row_base, starts_base,
                dq_base, sq_t, sdq_t, i0, j, slope2, qk_scale2, scale, T, window, D, BLOCK_M,
                True, ALIBI, DOCS or SKIP, WINDOW, PRECISION, DQ_ATOMIC,
            )  # fmt: skip
        for i0 in range(a_mid, b_mid, BLOCK_M):
            dk, dv = _dkdv_block(
                dk, dv, k, v, q_base, do_base, LSE + row_base, DELTA + row_base, starts_base,
                dq_base, sq_t, sdq_t, i0, j, slope2, qk_scale2, scale, T, window, D, BLOCK_M,
                False, ALIBI, DOCS or SKIP, WINDOW, PRECISION, DQ_ATOMIC,
            )  # fmt: skip
        for i0 in range(b_mid, hi, BLOCK_M):
            dk, dv = _dkdv_block(
                dk, dv, k, v, q_base, do_base, LSE + row_base, DELTA + row_base, starts_base,
                dq_base, sq_t, sdq_t, i0, j, slope2, qk_scale2, scale, T, window, D, BLOCK_M,
                True, ALIBI, DOCS or SKIP, WINDOW, PRECISION, DQ_ATOMIC,
            )  # fmt: skip
    offs_g = j[:, None].to(tl.int64) * sg_t + tl.arange(0, D)[None, :]
    dk = (dk * scale).to(DK.dtype.element_ty)
    tl.store(DK + b * sg_b + h * sg_h + offs_g, dk, mask=j_ok[:, None])
    tl.store(DV + b * sg_b + h * sg_h + offs_g, dv.to(DV.dtype.element_ty), mask=j_ok[:, None])


@triton.jit
def _dq_block(
    dq,
    q,
    do,
    lse,
    delta,
    k_base,
    v_base,
    sk_t,
    sv_t,
    j0,
    i,
    starts_i,
    slope2,
    qk_scale2,
    T,
    window,
    D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    ALIBI: tl.constexpr,
    BOUNDED: tl.constexpr,
    WINDOW: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Add key block j0's contribution to the query block's dq~ [BLOCK_M, D] (unscaled)."""
    j = j0 + tl.arange(0, BLOCK_N)
    j_ok = j < T
    d = tl.arange(0, D)
    k = tl.load(k_base + j[:, None].to(tl.int64) * sk_t + d[None, :], mask=j_ok[:, None], other=0.0)
    v = tl.load(v_base + j[:, None].to(tl.int64) * sv_t + d[None, :], mask=j_ok[:, None], other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale2  # [BLOCK_M, BLOCK_N]
    if ALIBI:
        s = s - slope2 * (i[:, None] - j[None, :]).to(tl.float32)
    if MASKED:
        s = _logits_masked(s, i, j, starts_i, window, BOUNDED, WINDOW)
    p = tl.exp2(s - lse[:, None])
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    return tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)


@triton.jit
def _dq_kernel(
    QR,
    K,
    V,
    DOR,
    LSE,
    DELTA,
    SLOPES,
    STARTS,
    DQ,
    sq_b,
    sq_t,
    sq_h,
    sk_b,
    sk_t,
    sk_h,
    sv_b,
    sv_t,
    sv_h,
    sdq_b,
    sdq_t,
    sdq_h,
    sd_b,
    sd_h,
    T,
    HQ,
    G,
    qk_scale2,
    scale,
    window,
    D: tl.constexpr,
    ALIBI: tl.constexpr,
    DOCS: tl.constexpr,
    WINDOW: tl.constexpr,
    SKIP: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dq~ (float32) of one query block, summed over its key blocks in order, in registers:
    the deterministic backward's dq (no atomics), over the forward's own key ranges."""
    bh = tl.program_id(1)
    b = (bh // HQ).to(tl.int64)
    hq = bh % HQ
    h = hq // G
    i0 = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M  # longest rows first
    i = i0 + tl.arange(0, BLOCK_M)
    i_ok = i < T
    offs = i[:, None].to(tl.int64) * sq_t + tl.arange(0, D)[None, :]
    q = tl.load(QR + b * sq_b + hq * sq_h + offs, mask=i_ok[:, None], other=0.0)
    do = tl.load(DOR + b * sq_b + hq * sq_h + offs, mask=i_ok[:, None], other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * T + i, mask=i_ok, other=0.0)
    delta = tl.load(DELTA + bh.to(tl.int64) * T + i, mask=i_ok, other=0.0)
    slope2 = _log2_slope(SLOPES, hq, ALIBI)
    starts_i = _row_starts(STARTS + b * sd_b + hq * sd_h, i, i_ok, BLOCK_M, DOCS or SKIP)
    i_last = tl.minimum(i0 + BLOCK_M, T) - 1
    lo, a_mid, b_mid, hi = _key_range(starts_i, i_ok, i0, i_last, window, BLOCK_N, WINDOW)
    k_base = K + b * sk_b + h * sk_h
    v_base = V + b * sv_b + h * sv_h
    dq = tl.zeros([BLOCK_M, D], tl.float32)
    for j0 in range(lo, a_mid, BLOCK_N):
        dq = _dq_block(
            dq, q, do, lse, delta, k_base, v_base, sk_t, sv_t, j0, i, starts_i, slope2,
            qk_scale2, T, window, D, BLOCK_N, True, ALIBI, DOCS or SKIP, WINDOW, PRECISION,
        )  # fmt: skip
    for j0 in range(a_mid, b_mid, BLOCK_N):
        dq = _dq_block(
            dq, q, do, lse, delta, k_base, v_base, sk_t, sv_t, j0, i, starts_i, slope2,
            qk_scale2, T, window, D, BLOCK_N, False, ALIBI, DOCS or SKIP, WINDOW, PRECISION,
        )  # fmt: skip
    for j0 in range(b_mid, hi, BLOCK_N):
        dq = _dq_block(
            dq, q, do, lse, delta, k_base, v_base, sk_t, sv_t, j0, i, starts_i, slope2,
            qk_scale2, T, window, D, BLOCK_N, True, ALIBI, DOCS or SKIP, WINDOW, PRECISION,
        )  # fmt: skip
    offs_dq = i[:, None].to(tl.int64) * sdq_t + tl.arange(0, D)[None, :]
    dq = (dq * scale).to(DQ.dtype.element_ty)
    tl.store(DQ + b * sdq_b + hq * sdq_h + offs_dq, dq, mask=i_ok[:, None])


@triton.jit
def _unrotate_one(x_base, dxr_base, dx_base, t, t_ok, stride_t, c, s, P: tl.constexpr):
    """Store dx = R(-phi) dx~ and return x cross dx = x_1 dx_2 - x_2 dx_1 (float32), the
    tensor's term of dL/dphi: rotations keep this cross product, so it equals x~ cross dx~."""
    x1, x2 = _load_halves(x_base, t, t_ok, stride_t, P)
    g1, g2 = _load_halves(dxr_base, t, t_ok, stride_t, P)
    dx1 = g1 * c + g2 * s
    dx2 = g2 * c - g1 * s
    _store_halves(dx_base, t, t_ok, stride_t, dx1, dx2, P)
    return x1 * dx2 - x2 * dx1


@triton.jit
def _unrotate_kernel(
    PHI,
    Q,
    DQR,
    DQ,
    O,
    DO,
    K,
    DKR,
    DK,
    V,
    DVR,
    DV,
    DPHI,
    sp_b,
    sp_t,
    sp_h,
    sq_b,
    sq_t,
    sq_h,
    sk_b,
    sk_t,
    sk_h,
    T,
    H,
    G,
    D: tl.constexpr,
    ROTATE_V: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """dq, dk (and dv when rotated) = R(-phi) of the rotated-space gradients, and
    dL/dphi = sum over the inputs x of x cross dx - sum over the outputs o of o cross dO.

    Q, DQR, DQ, O, DO are query-shaped with strides sq; K, DKR, DK, V, DVR, DV key-shaped
    with strides sk (all contiguous; DQR, DKR, DVR float32). The inputs x are the exact ones,
    not their rotations rounded to bfloat16, which keeps dL/dphi accurate in low precision.
    """
    P: tl.constexpr = D // 2
    b = (tl.program_id(1) // H).to(tl.int64)
    h = tl.program_id(1) % H
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < T
    c, s = _cos_sin(PHI + b * sp_b + h * sp_h, t, t_ok, sp_t, P)
    dphi = tl.zeros([BLOCK_T, P], tl.float32)
    for g in range(G):
        q_off = b * sq_b + (h * G + g) * sq_h
        dphi += _unrotate_one(Q + q_off, DQR + q_off, DQ + q_off, t, t_ok, sq_t, c, s, P)
        if ROTATE_V:
            o1, o2 = _load_halves(O + q_off, t, t_ok, sq_t, P)
            do1, do2 = _load_halves(DO + q_off, t, t_ok, sq_t, P)
            dphi -= o1 * do2 - o2 * do1
    k_off = b * sk_b + h * sk_h
    dphi += _unrotate_one(K + k_off, DKR + k_off, DK + k_off, t, t_ok, sk_t, c, s, P)
    if ROTATE_V:
        dphi += _unrotate_one(V + k_off, DVR + k_off, DV + k_off, t, t_ok, sk_t, c, s, P)
    offs = t[:, None].to(tl.int64) * (H * P) + tl.arange(0, P)[None, :]
    tl.store(DPHI + b * T * H * P + h * P + offs, dphi, mask=t_ok[:, None])


# ----------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------


def _configs(candidates: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    """(BLOCK_M, BLOCK_N, warps, stages) candidates for the autotuner on a GPU. The interpreter
    gets 16 x 16 tiles alone: small test sequences then cross several blocks, no tuning runs."""
    if INTERPRETING:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16})]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
        for m, n, w, s in candidates
    ]


# `make gpu-check` pins one config per autotuned kernel (bench.gpu_check): ROTALIBI_TILES holds a
# JSON object {kernel: [BLOCK_M, BLOCK_N, warps, stages]}, and the autotuner has nothing to tune.
PIN_ENV = "ROTALIBI_TILES"


def _candidates(kernel: str, tuned: list[tuple[int, int, int, int]]) -> list[tuple]:
    """The autotuner's candidates for `kernel`: `tuned`, or the one config PIN_ENV pins."""
    pinned = json.loads(os.environ.get(PIN_ENV) or "{}").get(kernel)
    return [tuple(pinned)] if pinned else tuned


def shared_memory_estimate(config: triton.Config, *, kernel: str, dtype: str, head_dim: int) -> int:
    """Bytes of shared memory `config` needs: an upper bound of Triton 3.8's allocations on
    sm_80 and sm_90 for the JIT's aligned specialization (bench.compile_gate checks it against
    every compiled variant; bench/results/check_gpu_compile_vm.json has them). With e-byte
    inputs, in [rows, d] operand tiles: the forward holds its q tile and, per pipeline stage,
    a k and a v tile (sm_90 buffers every stage, sm_80 one fewer); dk/dv holds, per stage, a
    q and a dO tile with their log-sum-exp and delta rows, and its k and v tiles twice over
    (the second pair: layout conversions, measured at up to 0.6 of it). Float32 forwards also
    stage their q tile twice and the [BLOCK_M, BLOCK_N] probabilities."""
    m, n, stages = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_stages
    d, e = head_dim, 4 if dtype == "fp32" else 2
    if kernel == "_fwd_kernel":
        need = e * d * (m + 2 * n * stages) + 1024
        return need + (e * d * m + 4 * m * n if dtype == "fp32" else 0)
    return stages * m * (2 * e * d + 16) + 4 * e * n * d


# Configs the gate measured spilling registers with 16-bit inputs (bfloat16 and float16 runs of
# bench/results/check_gpu_compile_vm.json; `python -m bench.compile_gate --spills FILE` prints
# this table's grouped rows), keyed (kernel, sm, head dim, grouped); prune_configs drops them.
# The gate compiles only the configs pruning keeps, so grouped heads were measured where the
# ungrouped ones keep a config, and a config that spills without grouping counts with it too.
# (kernel, sm, head dim) -> {(BLOCK_M, BLOCK_N, warps, stages)}: without grouped heads, and
# what spills only with them (several query heads per key/value head).
_SPILLING = {
    ("_dkdv_kernel", 80, 128): {(32, 64, 4, 4), (32, 128, 8, 3), (64, 64, 4, 3), (64, 64, 8, 2)},
    ("_dkdv_kernel", 90, 128): {(32, 64, 4, 4), (64, 64, 4, 3), (64, 64, 8, 2), (64, 128, 8, 3)},
    ("_fwd_kernel", 80, 32): {(64, 64, 8, 3)},
    ("_fwd_kernel", 80, 64): {(128, 64, 4, 3), (128, 128, 8, 3)},
    ("_fwd_kernel", 80, 128): {(64, 32, 4, 4), (64, 64, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3)},
    ("_fwd_kernel", 90, 64): {(128, 64, 4, 3)},
    ("_fwd_kernel", 90, 128): {(128, 64, 4, 3), (128, 128, 8, 3)},
}
_SPILLING_GROUPED_ONLY = {
    ("_dkdv_kernel", 80, 32): {(64, 64, 4, 3)},
    ("_dkdv_kernel", 80, 64): {
        (32, 64, 4, 4),
        (32, 64, 8, 3),
        (32, 128, 8, 3),
        (64, 64, 4, 3),
        (64, 64, 8, 2),
        (64, 128, 8, 3),
    },
    ("_dkdv_kernel", 80, 128): {(32, 32, 4, 3), (32, 64, 8, 3)},
    ("_dkdv_kernel", 90, 64): {(64, 64, 4, 3), (64, 64, 8, 2), (64, 128, 8, 3)},
    ("_dkdv_kernel", 90, 128): {(32, 128, 8, 3)},
    ("_fwd_kernel", 80, 128): {(64, 32, 4, 3)},
}
SPILLING_16BIT: dict[tuple[str, int, int, bool], set[tuple[int, int, int, int]]] = {
    **{(*key, False): tiles for key, tiles in _SPILLING.items()},
    **{
        (*key, True): _SPILLING.get(key, set()) | _SPILLING_GROUPED_ONLY.get(key, set())
        for key in _SPILLING.keys() | _SPILLING_GROUPED_ONLY.keys()
    },
}


def _tiles(config: triton.Config) -> tuple[int, int, int, int]:
    return (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps,
            config.num_stages)  # fmt: skip


def prune_configs(
    configs: list[triton.Config],
    *,
    kernel: str,
    dtype: str,
    head_dim: int,
    shared_memory: int,
    arch: int | None = None,
    grouped: bool = False,
) -> list[triton.Config]:
    """The configs whose shared memory fits `shared_memory` bytes and, with 16-bit inputs on
    sm_`arch`, that do not spill (SPILLING_16BIT; `grouped`: several query heads per
    key/value head), largest tiles first; the smallest one when none is left (the compile
    gate then says why)."""

    def need(c: triton.Config) -> int:
        return shared_memory_estimate(c, kernel=kernel, dtype=dtype, head_dim=head_dim)

    key = (kernel, arch, head_dim, grouped)
    spilling = SPILLING_16BIT.get(key, set()) if dtype != "fp32" else set()
    ordered = sorted(configs, key=need, reverse=True)
    kept = [c for c in ordered if need(c) <= shared_memory and _tiles(c) not in spilling]
    return kept or ordered[-1:]


def _prune_for_device(kernel: str):
    """early_config_prune for `kernel`: the configs that fit the current device."""

    def prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        x = named_args["Q" if kernel == "_fwd_kernel" else "QR"]
        active = triton.runtime.driver.active
        properties = active.utils.get_device_properties(x.device.index)
        dtype = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[x.dtype]
        return prune_configs(
            configs, kernel=kernel, dtype=dtype, head_dim=kwargs["D"],
            shared_memory=properties["max_shared_mem"], arch=active.get_current_target().arch,
            grouped=named_args["G"] > 1,
        )  # fmt: skip

    return {"early_config_prune": prune}


# The autotuner's (BLOCK_M, BLOCK_N, warps, stages) candidates, before `prune_configs`.
FWD_CONFIGS = [
    (128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (64, 32, 4, 4),
    (64, 64, 8, 3), (64, 32, 4, 3),
]  # fmt: skip
DKDV_CONFIGS = [
    (32, 128, 8, 3), (64, 64, 4, 3), (64, 128, 8, 3), (32, 64, 4, 4), (64, 64, 8, 2),
    (32, 64, 8, 3), (32, 32, 4, 3), (32, 32, 8, 3),
]  # fmt: skip
# T in power-of-two buckets: evaluating at many lengths does not retune at each one.
_TUNING_KEY = ["T_BUCKET", "D", "ALIBI", "DOCS", "WINDOW", "SKIP", "PRECISION"]
_fwd = triton.autotune(
    _configs(_candidates("_fwd_kernel", FWD_CONFIGS)),
    key=[*_TUNING_KEY, "ROTATE", "ROTATE_V"],
    prune_configs_by=None if INTERPRETING else _prune_for_device("_fwd_kernel"),
)(_fwd_kernel)
_dkdv = triton.autotune(
    _configs(_candidates("_dkdv_kernel", DKDV_CONFIGS)),
    key=_TUNING_KEY,
    prune_configs_by=None if INTERPRETING else _prune_for_device("_dkdv_kernel"),
    reset_to_zero=["DQ"],  # each tuning run adds into it (DQ_ATOMIC: the autotuned path)
)(_dkdv_kernel)


def elementwise_block(head_dim: int) -> int:
    """Tokens per program of the elementwise kernels: 2048 elements of each tensor, which keeps
    the unrotate pass (cos, sin and the halves of several tensors per token) within registers
    at every head dim (bench.compile_gate checks it: 64 tokens at d = 128 spilled 800 B)."""
    return 16 if INTERPRETING else 2048 // head_dim


def _strides(x: Tensor | None) -> tuple[int, int, int]:
    """(batch, time, head) strides of a [B, T, H, D] tensor (zeros for an absent one)."""
    return (0, 0, 0) if x is None else (x.stride(0), x.stride(1), x.stride(2))


def _rotate(x: Tensor, phi: Tensor) -> Tensor:
    """R(phi) x as a new contiguous tensor of x's dtype; x [B, T, HX, D], phi [B, T, H, D/2]."""
    B, T, HX, D = x.shape
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    block = elementwise_block(D)
    _rotate_kernel[(triton.cdiv(T, block), B * HX)](
        x, phi, y, *_strides(x), *_strides(phi), *_strides(y), T, HX, HX // phi.shape[2],
        D=D, BLOCK_T=block,
    )  # fmt: skip
    return y


def _flags(q: Tensor, slopes: Tensor | None, docs: bool, window: int | None, skip: bool) -> dict:
    return dict(
        ALIBI=slopes is not None,
        DOCS=docs,
        WINDOW=window is not None,
        SKIP=skip,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )


# The deterministic mode's tiles (train.deterministic): pinned, so every process sums in the
# same order. Per kernel, the first of these the device's shared memory fits (`prune_configs`;
# _dq_kernel holds q and dO as dk/dv holds k and v, so it is estimated with its tiles swapped).
# 64 x 64 with 8 warps: at d = 128, 16-bit, no spills on sm_80 or sm_90 without grouped heads
# (bench/results/check_gpu_compile_vm.json); with GQA dk/dv spills there (sm_90: 116 B a thread).
DETERMINISTIC_TILES = {
    "_fwd_kernel": [(64, 64, 8, 3), (64, 32, 4, 2), (32, 32, 4, 1)],
    "_dkdv_kernel": [(64, 64, 8, 2), (32, 64, 4, 2), (32, 32, 4, 1)],
    "_dq_kernel": [(64, 64, 8, 2), (64, 32, 4, 2), (32, 32, 4, 1)],
}


@functools.cache
def _pinned(
    kernel: str, dtype: torch.dtype, head_dim: int, grouped: bool, device: torch.device
) -> dict:
    """Launch keywords (tiles, warps, stages) of `kernel` in the deterministic mode (`grouped`:
    several query heads per key/value head)."""
    configs = _configs(DETERMINISTIC_TILES[kernel])
    if not INTERPRETING:
        properties = triton.runtime.driver.active.utils.get_device_properties(device.index)
        name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
        swap = kernel == "_dq_kernel"
        estimated = [_swapped(c) for c in configs] if swap else configs
        # The forward's deterministic launch is its autotuned variant, so the configs that
        # spill there are passed over too; dk/dv without atomics and dq are other variants.
        active = triton.runtime.driver.active
        arch = active.get_current_target().arch if kernel == "_fwd_kernel" else None
        fits = prune_configs(
            estimated, kernel="_dkdv_kernel" if swap else kernel, dtype=name,
            head_dim=head_dim, shared_memory=properties["max_shared_mem"], arch=arch,
            grouped=grouped,
        )  # fmt: skip
        configs = [_swapped(c) for c in fits] if swap else fits
    return configs[0].all_kwargs()


def _swapped(config: triton.Config) -> triton.Config:
    """`config` with BLOCK_M and BLOCK_N exchanged."""
    tiles = {"BLOCK_M": config.kwargs["BLOCK_N"], "BLOCK_N": config.kwargs["BLOCK_M"]}
    return triton.Config(tiles, num_warps=config.num_warps, num_stages=config.num_stages)


def query_heads_per_program(block_m: int, group: int) -> int:
    """How many query heads one forward program serves (HEADS in `_fwd_kernel`): `group` (a
    power of two dividing the key/value group) when each head keeps at least 16 of the
    block_m rows, else 1."""
    return group if block_m // group >= 16 else 1


def _gradient_buffer(x: Tensor, *, final: bool) -> Tensor:
    """An empty gradient like x. The kernels accumulate in float32 registers and store in the
    buffer's dtype: x's for a final gradient, float32 when the unrotate pass still reads it."""
    return torch.empty(x.shape, dtype=x.dtype if final else torch.float32, device=x.device)


def _bound_strides(starts: Tensor | None) -> tuple[int, int]:
    """(batch, head) strides of visibility bounds: [B, T] document bounds (one for every head)
    or [B, HQ, T] skipping bounds (`kernels.alibi_reach.alibi_bounds`)."""
    if starts is None:
        return 0, 0
    return starts.stride(0), starts.stride(1) if starts.dim() == 3 else 0


class _FusedAttention(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, q, k, v, phi, slopes, starts, ends, flags, rotate_values, window, scale, pinned
    ):
        B, T, HQ, D = q.shape
        H = k.shape[2]
        rotate_v = phi is not None and rotate_values
        kr = k if phi is None else _rotate(k, phi)
        vr = _rotate(v, phi) if rotate_v else v
        o = torch.empty_like(q)
        lse = torch.empty((B, HQ, T), dtype=torch.float32, device=q.device)
        tiles = _pinned("_fwd_kernel", q.dtype, D, HQ > H, q.device) if pinned else {}
        kernel = _fwd_kernel if pinned else _fwd

        def grid(meta: dict) -> tuple[int, int]:
            heads = query_heads_per_program(meta["BLOCK_M"], meta["GROUP"])
            return triton.cdiv(T, meta["BLOCK_M"] // heads), B * HQ // heads

        kernel[grid](
            q, kr, vr, q if phi is None else phi, q if slopes is None else slopes,
            q if starts is None else starts, o, lse,
            *_strides(q), *_strides(kr), *_strides(vr), *_strides(phi), *_strides(o),
            *_bound_strides(starts), T, HQ, HQ // H, scale * LOG2E, window or 0,
            triton.next_power_of_2(T), D=D, ROTATE=phi is not None, ROTATE_V=rotate_v,
            GROUP=(HQ // H) & -(HQ // H), **flags, **tiles,
        )  # fmt: skip
        # k and v, not their rotations: the backward rotates them again, and needs them exact.
        ctx.save_for_backward(q, k, v, phi, slopes, starts, ends, o, lse)
        ctx.rotate_v, ctx.window, ctx.scale = rotate_v, window, scale
        ctx.flags, ctx.pinned = flags, pinned
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, phi, slopes, starts, ends, o, lse = ctx.saved_tensors
        B, T, HQ, D = q.shape
        H = k.shape[2]
        G = HQ // H
        do = do.contiguous()
        delta = torch.empty_like(lse)
        block = elementwise_block(D)
        _row_dot_kernel[(triton.cdiv(T, block), B * HQ)](
            o, do, delta, *_strides(o), *_strides(do), T, HQ, D=D, BLOCK_T=block
        )
        qr, kr = (q, k) if phi is None else (_rotate(q, phi), _rotate(k, phi))
        vr, dor = (_rotate(v, phi), _rotate(do, phi)) if ctx.rotate_v else (v, do)
        # Without pinning dk/dv add dq atomically (float32, into zeros); pinned, _dq_kernel
        # writes it.
        if ctx.pinned:
            dqr = _gradient_buffer(q, final=phi is None)
        else:
            dqr = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        dkr = _gradient_buffer(k, final=phi is None)
        dvr = _gradient_buffer(v, final=not ctx.rotate_v)
        slopes_arg = q if slopes is None else slopes
        starts_arg = q if starts is None else starts
        tiles = _pinned("_dkdv_kernel", q.dtype, D, G > 1, q.device) if ctx.pinned else {}
        kernel = _dkdv_kernel if ctx.pinned else _dkdv
        kernel[lambda meta: (triton.cdiv(T, meta["BLOCK_N"]), B * H)](
            qr, kr, vr, dor, lse, delta, slopes_arg, starts_arg, q if ends is None else ends,
            dqr, dkr, dvr, *_strides(qr), *_strides(kr), *_strides(vr), *_strides(dqr),
            *_strides(dkr), *_bound_strides(starts), T, H, G, ctx.scale * LOG2E, ctx.scale,
            ctx.window or 0, triton.next_power_of_2(T), D=D, DQ_ATOMIC=not ctx.pinned,
            **ctx.flags, **tiles,
        )  # fmt: skip
        if ctx.pinned:
            tiles = _pinned("_dq_kernel", q.dtype, D, G > 1, q.device)
            _dq_kernel[(triton.cdiv(T, tiles["BLOCK_M"]), B * HQ)](
                qr, kr, vr, dor, lse, delta, slopes_arg, starts_arg, dqr,
                *_strides(qr), *_strides(kr), *_strides(vr), *_strides(dqr),
                *_bound_strides(starts), T, HQ, G, ctx.scale * LOG2E, ctx.scale,
                ctx.window or 0, D=D, **ctx.flags, **tiles,
            )  # fmt: skip
        if phi is None:
            return dqr.to(q.dtype), dkr.to(k.dtype), dvr.to(v.dtype), *(None,) * 9
        dq, dk = torch.empty_like(q), torch.empty_like(k)
        dv = torch.empty_like(v) if ctx.rotate_v else dvr.to(v.dtype)
        dphi = torch.empty(phi.shape, dtype=torch.float32, device=q.device)
        _unrotate_kernel[(triton.cdiv(T, block), B * H)](
            phi, q, dqr, dq, o, do, k, dkr, dk, v, dvr, dv, dphi,
            *_strides(phi), *_strides(q), *_strides(k), T, H, G,
            D=D, ROTATE_V=ctx.rotate_v, BLOCK_T=block,
        )  # fmt: skip
        return dq, dk, dv, dphi.to(phi.dtype), *(None,) * 8


# ----------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------


def _check_inputs(q, k, v, angles, alibi_slopes, window, starts, ends) -> None:
    """Raise ValueError naming the first problem with the fused kernel's inputs."""
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(
            f"q must be [B, T, HQ, d] and k, v [B, T, H, d]; got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    B, T, HQ, D = q.shape
    H = k.shape[2]
    if k.shape[:2] != (B, T) or k.shape[3] != D or HQ % H:
        raise ValueError(
            f"k, v {tuple(k.shape)} do not fit q {tuple(q.shape)}: same B, T, d and a number "
            "of key/value heads H dividing the query heads HQ"
        )
    if D not in HEAD_DIMS:
        raise ValueError(f"head dim {D} is not supported by the fused kernel: use {HEAD_DIMS}")
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(
            f"q, k, v must share one dtype among {DTYPES}; got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if not (q.is_cuda or INTERPRETING) or k.device != q.device or v.device != q.device:
        raise ValueError(
            f"the fused kernel runs on CUDA tensors (on the CPU only under TRITON_INTERPRET=1); "
            f"got q on {q.device}, k on {k.device}, v on {v.device}"
        )
    if angles is not None and tuple(angles.shape) != (B, T, H, D // 2):
        raise ValueError(
            f"angles must be [B, T, H, d/2] = {(B, T, H, D // 2)}, got {tuple(angles.shape)}"
        )
    if alibi_slopes is not None and tuple(alibi_slopes.shape) != (HQ,):
        raise ValueError(f"alibi_slopes must be [HQ] = [{HQ}], got {tuple(alibi_slopes.shape)}")
    if window is not None and window < 1:
        raise ValueError(f"window must be a positive number of tokens or None, got {window}")
    if (starts is None) != (ends is None):
        raise ValueError("pass both document starts and ends, or neither")
    if starts is not None and (starts.shape != (B, T) or ends.shape != (B, T)):
        raise ValueError(f"document starts and ends must be [B, T] = {(B, T)}")


def fused_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    angles: Tensor | None = None,
    alibi_slopes: Tensor | None = None,
    *,
    rotate_values: bool = True,
    window: int | None = None,
    starts: Tensor | None = None,
    ends: Tensor | None = None,
    scale: float | None = None,
    skip_eps: float = 0.0,
    deterministic: bool = False,
) -> Tensor:
    """The fused kernel on accumulated angles: what `kernels.attention` dispatches to on CUDA.

    q [B, T, HQ, d]; k, v [B, T, H, d]; angles [B, T, H, d/2] (phi, not increments) or None;
    alibi_slopes [HQ] or None; starts, ends int32 [B, T] document bounds
    (`kernels.hybrid.documents`) or None. skip_eps > 0 (with ALiBi): skip the keys that move
    the output by at most skip_eps x max|v| (`kernels.alibi_reach.alibi_bounds`: per token,
    the same pairs in forward and backward). deterministic: pinned tiles and dq summed in a
    fixed order (no atomics), so equal inputs give bitwise-equal outputs and gradients on a
    GPU (about one more matmul per pair of blocks in the backward). Differentiable in q, k, v
    and angles.
    """
    _check_inputs(q, k, v, angles, alibi_slopes, window, starts, ends)
    if angles is not None:  # the kernels read pairs at unit stride
        angles = (angles if angles.dtype == torch.float64 else angles.float()).contiguous()
    if alibi_slopes is not None:
        alibi_slopes = alibi_slopes.detach().float().contiguous()
    if starts is not None:
        starts, ends = starts.int().contiguous(), ends.int().contiguous()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    docs, skip = starts is not None, skip_eps > 0 and alibi_slopes is not None
    if skip:
        starts, ends = alibi_bounds(q, k, alibi_slopes, scale, skip_eps, starts)
    flags = _flags(q, alibi_slopes, docs, window, skip)
    return _FusedAttention.apply(
        q, k, v, angles, alibi_slopes, starts, ends, flags, rotate_values, window, scale,
        deterministic,
    )  # fmt: skip


def hybrid_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    delta: Tensor | None = None,
    alibi_slopes: Tensor | None = None,
    *,
    rotate_values: bool = True,
    window: int | None = None,
    cu_seqlens: Tensor | None = None,
    scale: float | None = None,
    skip_eps: float = 0.0,
    deterministic: bool = False,
) -> Tensor:
    """Accumulated rotations + ALiBi attention: the Triton scan, then the fused kernel.

    q [B, T, HQ, d]; k, v [B, T, H, d] (HQ a multiple of H; d in 32, 64, 128; float32,
    bfloat16 or float16). delta [B, T, H, d/2]: per-token angle increments, phi = their
    inclusive cumsum over each document (None: no rotation; constant theta: RoPE).
    alibi_slopes [HQ]: bias -m_h (i - j), or None. rotate_values: rotate v by phi_j and the
    output back by -phi_i. window: attend only to i - j < window. cu_seqlens [N + 1]: packed
    documents of a single row (B = 1). scale: default 1/sqrt(d). skip_eps, deterministic: as
    in `fused_attention`. Returns o like q, differentiable in q, k, v and delta.
    """
    B, T = q.shape[:2]
    starts = ends = None
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"cu_seqlens packs documents into one row: q must have B = 1, got {B}")
        starts, ends = cu_seqlens_bounds(cu_seqlens.to(q.device), T)
    phi = None
    if delta is not None:
        if tuple(delta.shape) != (B, T, k.shape[2], q.shape[3] // 2):
            raise ValueError(
                f"delta must be [B, T, H, d/2] = {(B, T, k.shape[2], q.shape[3] // 2)}, "
                f"got {tuple(delta.shape)}"
            )
        phi = scan_angles(delta, starts, ends)
    return fused_attention(
        q, k, v, phi, alibi_slopes, rotate_values=rotate_values, window=window,
        starts=starts, ends=ends, scale=scale, skip_eps=skip_eps, deterministic=deterministic,
    )  # fmt: skip
