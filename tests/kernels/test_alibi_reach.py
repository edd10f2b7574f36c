"""Skipping what ALiBi or a forget gate provably zeroes (`kernels.alibi_reach`): the bound
against the exact dropped mass, and the skipping paths against the same attention without
skipping."""

from __future__ import annotations

import math

import pytest
import torch

import kernels
from kernels import AlibiTable
from kernels.alibi_reach import (
    REACH_BLOCK,
    ROUNDING_MARGIN,
    alibi_bounds,
    alibi_reach,
    block_reach,
    gate_reach,
    row_reach_bounds,
    visited_blocks,
    visited_fraction,
)
from kernels.blockwise import DiagonalSweep
from kernels.hybrid.documents import document_bounds
from kernels.reference import reference_attention
from model.positions import alibi_slopes

EPS = 1e-6


def _alibi(slopes: torch.Tensor, length: int, dtype: torch.dtype) -> AlibiTable:
    table = -slopes[:, None] * torch.arange(length, dtype=torch.float64)
    return AlibiTable.wrap(table.to(dtype), slopes.to(dtype))


def _inputs(T: int, dtype: torch.dtype, *, qk_std: float = 1.0):
    """Hybrid-style inputs: 8 query heads over 4 key/value heads, learned-looking angles,
    three packed documents per row, the default slopes with the key/value heads' pairs of
    query heads in a shuffled order (so the sweep has to reorder heads). Small q and k
    (`qk_std`) make the bound nearly tight: the mass beyond the reach then shows in float32."""
    torch.manual_seed(0)
    B, HQ, H, D = 2, 8, 4, 32
    q = qk_std * torch.randn(B, T, HQ, D, dtype=dtype)
    k = qk_std * torch.randn(B, T, H, D, dtype=dtype)
    v = torch.randn(B, T, H, D, dtype=dtype)
    angles = torch.rand(B, T, H, D // 2, dtype=dtype).cumsum(1)
    doc_ids = torch.zeros(B, T, dtype=torch.int64)
    doc_ids[0, T // 3 :] += 1
    doc_ids[:, T // 2 :] += 1
    doc_ids[1, T - 7 :] += 1
    slopes = alibi_slopes(HQ)[torch.tensor([2, 3, 0, 1, 6, 7, 4, 5])]
    return q, k, v, angles, doc_ids, _alibi(slopes, T, dtype)


def _skipped_and_full(leaves: list[torch.Tensor], **kwargs) -> tuple[tuple, tuple]:
    """Output and the gradients into `leaves` (q, k, v first) of `kernels.attention` with
    skipping (EPS) and without, for the same random upstream gradient."""
    upstream = torch.randn_like(leaves[0])
    results = []
    for eps in (EPS, 0.0):
        out = kernels.attention(*leaves[:3], skip_eps=eps, **kwargs)
        results.append((out, *torch.autograd.grad((out * upstream).sum(), leaves)))
    return results[0], results[1]


def test_bound_holds_against_the_exact_dropped_mass():
    """float64, from the full attention matrix: the mass beyond each head's reach is at most
    eps / 2 for every query, and the skipped output moves by at most eps max|v|."""
    T = 320
    q, k, v, angles, doc_ids, bias = _inputs(T, torch.float64)
    scale = q.shape[-1] ** -0.5
    reach = alibi_reach(q, k, bias.slopes, scale, EPS)
    assert (reach < T).sum() >= 4  # the steep heads skip; the bound is not vacuous
    qr, kr = kernels.rotate(q, angles), kernels.rotate(k, angles)
    G = q.shape[2] // k.shape[2]
    logits = torch.einsum("bihd,bjhd->bhij", qr, kr.repeat_interleave(G, dim=2)) * scale
    dist = torch.arange(T)[:, None] - torch.arange(T)[None, :]
    logits = logits + bias[:, dist.clamp(min=0)]
    visible = (dist >= 0) & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])
    probs = logits.masked_fill(~visible, float("-inf")).softmax(-1)
    beyond = dist[None, None] >= reach[:, :, None, None]
    dropped = (probs * beyond).sum(-1)  # [B, HQ, T]
    assert dropped.max() <= EPS / 2
    assert dropped.max() > 0  # something is dropped at all

    common = dict(angles=angles, rotate_values=True, bias=bias, doc_ids=doc_ids, block=16)
    skipped = kernels.attention(q, k, v, skip_eps=EPS, **common)
    exact = reference_attention(q, k, v, angles=angles, rotate_values=True, bias=bias,
                                doc_ids=doc_ids)  # fmt: skip
    error = (skipped - exact).norm(dim=-1).amax()
    assert error <= EPS * v.norm(dim=-1).amax()
    assert error > 0  # the skipping path did skip


def test_blockwise_skipping_equals_no_skip_in_float32():
    """Output and every gradient (q, k, v, angles) with skipping equal the no-skip result
    within 1e-6 relative, with fewer key blocks visited."""
    T, block = 512, 16
    q, k, v, angles, doc_ids, bias = _inputs(T, torch.float32, qk_std=0.1)
    leaves = [t.requires_grad_() for t in (q, k, v, angles)]
    results = _skipped_and_full(
        leaves, angles=angles, rotate_values=True, bias=bias, doc_ids=doc_ids, block=block
    )
    for skipped, full in zip(*results, strict=True):
        assert (skipped - full).abs().max() <= 1e-6 * full.abs().max()
        assert not torch.equal(skipped, full)

    reach = alibi_reach(q, k, bias.slopes, q.shape[-1] ** -0.5, EPS)
    sweep = DiagonalSweep(q, k, block=block, doc_ids=None, bias=None, window=None, reach=reach)
    visited = sum(sweep.head_steps)
    assert visited < len(sweep.head_steps) * sweep.n
    assert sweep.order is not None  # the shuffled slopes made the sweep reorder heads


@pytest.mark.parametrize("eps", [0.0, EPS])
def test_reach_is_everything_without_a_slope_or_eps(eps):
    q, k = torch.randn(2, 1, 50, 2, 8)
    slopes = torch.tensor([0.0, 2.0]) if eps else torch.tensor([2.0, 2.0])
    reach = alibi_reach(q, k, slopes, 8**-0.5, eps)
    assert reach[0, 0] == 50
    assert (reach[0, 1] < 50) == (eps > 0)


def test_fused_kernel_skipping_equals_no_skip(monkeypatch):
    """The Triton kernels (interpreted without CUDA; unequal query and key tiles): forward,
    the dk/dv/dq kernel with skipping stay within 1e-6 of the no-skip output and gradients."""
    import triton

    import kernels.hybrid.attention as fused
    from kernels.hybrid import document_bounds, fused_attention

    config = triton.Config({"BLOCK_M": 32, "BLOCK_N": 16})
    for tuner in (fused._fwd, fused._dkdv):
        monkeypatch.setattr(tuner, "configs", [config])
    T = 144
    q, k, v, angles, doc_ids, _ = _inputs(T, torch.float32, qk_std=0.1)
    q, k, v, angles = (x[:1, :, :4] for x in (q, k, v, angles))
    q, k, v, angles = q.contiguous(), *(x[:, :, :2].contiguous() for x in (k, v, angles))
    starts, ends = document_bounds(doc_ids[1:])  # documents of 72, 65 and 7 tokens
    slopes = torch.tensor([1.0, 0.5, 0.25, 0.125])  # steep: they skip within 72 tokens
    assert alibi_reach(q, k, slopes, 32**-0.5, EPS)[0, 0] < T // 4
    leaves = [t.requires_grad_() for t in (q, k, v, angles)]
    upstream = torch.randn_like(q)
    results = []
    for eps in (EPS, 0.0):
        out = fused_attention(
            *leaves, slopes, rotate_values=True, starts=starts, ends=ends, skip_eps=eps
        )
        results.append((out, *torch.autograd.grad((out * upstream).sum(), leaves)))
    for skipped, full in zip(*results, strict=True):
        assert (skipped - full).abs().max() <= 1e-6 * full.abs().max()
        assert not torch.equal(skipped, full)  # blocks were skipped


def _forget_gates(B: int, T: int, HQ: int, dtype: torch.dtype) -> torch.Tensor:
    """Cumulative log forget gates F [B, T, HQ]: per pair of query heads (a key/value head's),
    strong gates (log f about -0.5) or weak ones (about -0.005), varying by token, with a
    stretch that forgets nothing."""
    torch.manual_seed(1)
    strength = torch.tensor([0.5, 0.5, 0.005, 0.005] * (HQ // 4), dtype=torch.float64)
    log_forget = -strength * torch.rand(B, T, HQ, dtype=torch.float64) * 2
    log_forget[:, T // 4 : T // 4 + 20] = 0.0  # a stretch that keeps everything
    return log_forget.cumsum(1).to(dtype)


def test_gate_bound_holds_against_the_exact_dropped_mass():
    """float64, from the full attention matrix with F_i - F_j: the mass beyond each row's and
    head's reach is at most eps / 2 for every query, and the output moves by at most eps max|v|."""
    T = 320
    q, k, v, angles, doc_ids, _ = _inputs(T, torch.float64)
    gate = _forget_gates(2, T, 8, torch.float64)
    scale = q.shape[-1] ** -0.5
    reach = gate_reach(q, k, gate, scale, EPS)
    assert (reach < T // 2).sum() == 8 and (reach == T).sum() == 8  # strong gates skip, weak not
    qr, kr = kernels.rotate(q, angles), kernels.rotate(k, angles)
    G = q.shape[2] // k.shape[2]
    logits = torch.einsum("bihd,bjhd->bhij", qr, kr.repeat_interleave(G, dim=2)) * scale
    logits = logits + (gate.transpose(1, 2)[..., :, None] - gate.transpose(1, 2)[..., None, :])
    dist = torch.arange(T)[:, None] - torch.arange(T)[None, :]
    visible = (dist >= 0) & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])
    probs = logits.masked_fill(~visible, float("-inf")).softmax(-1)
    beyond = dist[None, None] >= reach[:, :, None, None]
    dropped = (probs * beyond).sum(-1)  # [B, HQ, T]
    assert 0 < dropped.max() <= EPS / 2

    common = dict(angles=angles, rotate_values=True, gate=gate, doc_ids=doc_ids)
    skipped = kernels.attention(q, k, v, skip_eps=EPS, block=16, **common)
    exact = reference_attention(q, k, v, **common)
    error = (skipped - exact).norm(dim=-1).amax()
    assert 0 < error <= EPS * v.norm(dim=-1).amax()


def test_gate_reach_is_the_least_distance_that_fits():
    """Against a brute-force scan over every distance: the least R whose every pair at
    distance >= R has a + F_i - F_j <= log(eps / 2T)."""
    T = 96
    q, k, *_ = _inputs(T, torch.float64)
    gate = _forget_gates(2, T, 8, torch.float64)
    scale = q.shape[-1] ** -0.5
    reach = gate_reach(q, k, gate, scale, EPS)
    a = 2 * scale * (1 + 2**-6) * q.norm(dim=-1).amax(1)
    a = a * k.norm(dim=-1).amax(1).repeat_interleave(2, dim=1)
    distance = torch.arange(T)[:, None] - torch.arange(T)[None, :]
    for b in range(2):
        for h in range(8):
            pairs = gate[b, :, h, None] - gate[b, None, :, h]  # F_i - F_j
            fits = [
                bool(a[b, h] + pairs[distance >= R].max() <= math.log(EPS / (2 * T)))
                for R in range(1, T)
            ]
            expected = next((R for R, ok in zip(range(1, T), fits, strict=True) if ok), T)
            assert reach[b, h] == expected, (b, h)


def test_gate_skipping_equals_no_skip_in_float32():
    """Strong and weak gates, documents, GQA, rotated values: output and every gradient (q, k,
    v, angles, F) with skipping equal the no-skip result within 1e-6 relative, and the strong
    heads visit fewer key blocks (what they skip is below float32's resolution here; the float64
    test above shows a non-zero difference within the bound)."""
    T, block = 512, 16
    q, k, v, angles, doc_ids, _ = _inputs(T, torch.float32, qk_std=0.1)
    gate = _forget_gates(2, T, 8, torch.float32)
    leaves = [t.requires_grad_() for t in (q, k, v, angles, gate)]
    results = _skipped_and_full(
        leaves, angles=angles, rotate_values=True, gate=gate, doc_ids=doc_ids, block=block
    )
    for skipped, full in zip(*results, strict=True):
        assert (skipped - full).abs().max() <= 1e-6 * full.abs().max()

    reach = gate_reach(q, k, gate, q.shape[-1] ** -0.5, EPS)
    sweep = DiagonalSweep(q, k, block=block, doc_ids=None, bias=None, window=None, reach=reach)
    assert sum(sweep.head_steps) < len(sweep.head_steps) * sweep.n


# ---------------------------------------------------------------------------------------------
# The fused kernel's skipping: per-block norms, token-level bounds shared by forward and backward
# ---------------------------------------------------------------------------------------------


def _with_outliers(
    T: int, *, B: int = 1, HQ: int = 4, H: int = 2, D: int = 32, factor: float = 10.0
):
    """Random q, k (norm about 1) with one outlier token per row (q and k `factor` x longer)."""
    torch.manual_seed(0)
    q = torch.randn(B, T, HQ, D, dtype=torch.float64) * D**-0.5
    k = torch.randn(B, T, H, D, dtype=torch.float64) * D**-0.5
    for b in range(B):
        t = (b + 1) * T // (B + 2)
        q[b, t] *= factor
        k[b, t] *= factor
    return q, k


def test_block_reach_is_the_least_distance_that_fits():
    """Brute force over every distance: R_I is the least R for which every key at distance
    >= R from block I satisfies exp(a_I(R) - m R) / (1 - e^-m) <= eps / 2, a_I(R) from the
    largest |q| of the block and |k| of the block and of the keys beyond R."""
    T = 200
    q, k = _with_outliers(T)
    slopes = torch.tensor([1.0, 0.25, 0.0625, 0.0])
    scale = 32**-0.5
    reach = block_reach(q, k, slopes, scale, EPS)
    q_norm, k_norm = q.norm(dim=-1), k.norm(dim=-1).repeat_interleave(2, dim=2)
    for I, first in enumerate(range(0, T, REACH_BLOCK)):
        last = min(first + REACH_BLOCK, T) - 1
        for h in range(4):
            q_max = q_norm[0, first : last + 1, h].max()
            k_own = k_norm[0, first : last + 1, h].max()
            m = slopes[h].item()
            fits = [
                last < R
                or (
                    m > 0
                    and scale
                    * ROUNDING_MARGIN
                    * q_max
                    * (k_norm[0, : last - R + 1, h].max() + k_own)
                    - m * R
                    - math.log(-math.expm1(-m))
                    <= math.log(EPS / 2)
                )
                for R in range(1, last + 2)
            ]
            assert reach[0, I, h] == fits.index(True) + 1, (I, h)
    assert (reach[0, :, 3] == torch.tensor([64, 128, 192, 200])).all()  # zero slope: everything


def test_per_block_bounds_hold_against_the_exact_dropped_mass():
    """float64, from the full attention matrix with rotations, GQA, documents and an outlier
    token per row: every query's mass outside its bounds (first_i <= j) is at most eps / 2, the
    bounds are non-decreasing, ends_j is one past the last query that sees key j, and the
    per-block bounds never reach further back than the row-global reach of `alibi_reach`."""
    T = 320
    q, k, _, angles, doc_ids, bias = _inputs(T, torch.float64)
    outlier_q, outlier_k = _with_outliers(T, B=2, HQ=8, H=4)
    q, k = q * 0.3 + outlier_q, k * 0.3 + outlier_k
    scale = q.shape[-1] ** -0.5
    starts, _ = document_bounds(doc_ids)
    first, ends = alibi_bounds(q, k, bias.slopes, scale, EPS, starts)
    assert (first.diff(dim=-1) >= 0).all()
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    seen = (first[..., :, None] <= j) & (j <= i)  # [B, HQ, i, j]
    assert torch.equal(ends.long(), (seen * i).amax(dim=-2) + 1)

    qr, kr = kernels.rotate(q, angles), kernels.rotate(k, angles)
    logits = torch.einsum("bihd,bjhd->bhij", qr, kr.repeat_interleave(2, dim=2)) * scale
    logits = logits + bias[:, (i - j).clamp(min=0)]
    visible = (j <= i) & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])
    probs = logits.masked_fill(~visible, float("-inf")).softmax(-1)
    dropped = (probs * ~seen).sum(-1)
    assert 0 < dropped.max() <= EPS / 2
    assert not (seen & ~visible).any()  # the bounds never widen a document's keys
    row_global = row_reach_bounds(alibi_reach(q, k, bias.slopes, scale, EPS), T, starts)
    assert (first >= row_global).all() and (first > row_global).any()


def test_per_block_norms_visit_fewer_blocks_with_an_outlier_token():
    """T = 16384, one outlier token per row (q and k 10x longer): the row-global bound of
    `alibi_reach` lets the outlier set the reach of the whole row; per-block norms only of the
    blocks near it or whose far keys include it. Fractions of the causal 128 x 128 tiles."""
    T = 16384
    slopes = alibi_slopes(4)
    calm = visited_fraction(*(x.float() for x in _with_outliers(T, B=2, D=64, factor=1)), slopes,
                            eps=EPS)  # fmt: skip
    q, k = (x.float() for x in _with_outliers(T, B=2, D=64))
    per_block = visited_fraction(q, k, slopes, eps=EPS).item()
    row_global = visited_blocks(row_reach_bounds(alibi_reach(q, k, slopes, 64**-0.5, EPS), T), 128)
    today = (row_global / visited_blocks(row_reach_bounds(torch.full((2, 4), T), T), 128)).item()
    report = (
        f"visited fraction at T = {T} with one outlier token per row: per-block norms "
        f"{per_block:.4f}, row-global norms (before) {today:.4f}; without the outlier {calm:.4f}"
    )
    print(report)
    assert per_block < 0.75 * today, report
    assert calm <= per_block, report


def _masked_attention(q, k, v, slopes, scale, seen):
    """float64 brute force: causal ALiBi attention over the pairs `seen` [B, HQ, T, T] (q, k,
    v [B, T, H, D], one query head per key/value head)."""
    T = q.shape[1]
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    logits = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    logits = logits - slopes[:, None, None] * (i - j)
    probs = logits.masked_fill(~(seen & (j <= i)), float("-inf")).softmax(-1)
    return torch.einsum("bhij,bjhd->bihd", probs, v), probs


def test_skipped_gradients_stay_within_the_stated_bound():
    """docs/design.md "Skipping and the gradients": adversarial inputs, every far key aligned
    with the queries and every near key (the query's own among them) anti-aligned, so each
    dropped pair reaches the bound p_ij <= p_ii exp(a - m d). Against the exact no-skip
    gradients (float64): |dq_i - dq'_i| <= 6 s max|k| max|v| delta_i |g_i|, sum_j |dk_j - dk'_j|
    <= 6 s max|v| sum_i delta_i |g_i| |q_i|, sum_j |dv_j - dv'_j| <= 2 sum_i delta_i |g_i|, with
    delta_i <= eps / 2 the mass dropped from row i. The fused kernel (float32) computes the
    exact gradient of its skipped forward (1e-5) and so meets the same bounds."""
    from kernels.hybrid import fused_attention

    T, D, eps = 96, 32, 1e-2
    torch.manual_seed(3)
    u = torch.randn(D, dtype=torch.float64)
    u = u / u.norm()
    sign = torch.where(torch.arange(T) < T // 2, 1.0, -1.0).double()  # far: aligned; near: not
    q = (2.0 * u).expand(1, T, 1, D).clone()
    k = (2.0 * sign[:, None] * u)[None, :, None].clone()
    v = torch.randn(1, T, 1, D, dtype=torch.float64)
    g = torch.randn(1, T, 1, D, dtype=torch.float64)
    slopes = torch.tensor([0.5], dtype=torch.float64)
    scale = D**-0.5
    first, _ = alibi_bounds(q, k, slopes, scale, eps)
    j = torch.arange(T)
    seen = first[..., :, None] <= j
    assert (~seen).any()

    def grads(leaves, mask):
        out, probs = _masked_attention(*leaves, slopes, scale, mask)
        return probs, torch.autograd.grad((out * g).sum(), leaves)

    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    probs, exact = grads(leaves, torch.ones_like(seen))
    _, skipped = grads(leaves, seen)
    delta = (probs * ~seen).sum(-1)[0, 0]  # [T]: mass dropped per query
    assert delta.max() <= eps / 2
    assert delta.max() > eps / 20  # adversarial: near the bound, not vacuous

    g_norm, q_norm = g[0, :, 0].norm(dim=-1), q[0, :, 0].norm(dim=-1)
    v_max, k_max = v.norm(dim=-1).max(), k.norm(dim=-1).max()
    dq_bound = 6 * scale * k_max * v_max * delta * g_norm
    dk_bound = 6 * scale * v_max * (delta * g_norm * q_norm).sum()
    dv_bound = 2 * (delta * g_norm).sum()
    for name, kernel_grads in [("float64", skipped), ("fused", None)]:
        if kernel_grads is None:
            fused_leaves = [x.float().requires_grad_() for x in (q, k, v)]
            out = fused_attention(*fused_leaves, None, slopes.float(), skip_eps=eps)
            kernel_grads = torch.autograd.grad((out * g.float()).sum(), fused_leaves)
            for fused, expected in zip(kernel_grads, skipped, strict=True):
                assert (fused.double() - expected).abs().max() <= 1e-5 * expected.abs().max()
        dq, dk, dv = ((kg.double() - e)[0, :, 0] for kg, e in zip(kernel_grads, exact, strict=True))
        assert (dq.norm(dim=-1) <= dq_bound * (1 + 1e-4) + 1e-6).all(), name
        assert dk.norm(dim=-1).sum() <= dk_bound * (1 + 1e-4), name
        assert dv.norm(dim=-1).sum() <= dv_bound * (1 + 1e-4), name
        assert dv.norm(dim=-1).sum() > 0.1 * dv_bound, name  # the bound is nearly reached
    assert dq_bound.max() <= 3 * eps * scale * k_max * v_max * g_norm.max()


def _visited_pairs(tiles: tuple[int, int], deterministic: bool, monkeypatch) -> tuple:
    """The (query, key) pairs, [HQ, T, T] bool each, that the fused kernels' forward, dk/dv and
    dq passes sum over, read from their outputs: v_j = e_j makes o_i[j] = p_ij; the upstream
    gradient g_i = e_i makes dv_j[i] = p_ij; a component c e_{8 + j} of k_j, orthogonal to every
    q, makes dq_i[8 + j] = s c ds_ij, non-zero exactly where the pair is summed."""
    import triton

    import kernels.hybrid.attention as fused
    from kernels.hybrid import fused_attention

    config = triton.Config({"BLOCK_M": tiles[0], "BLOCK_N": tiles[1]})
    for tuner in (fused._fwd, fused._dkdv):
        monkeypatch.setattr(tuner, "configs", [config])
    monkeypatch.setattr(fused, "_pinned", lambda *args: config.all_kwargs())
    T, D = 96, 128
    q, k = (x[..., :8].float() for x in _with_outliers(T, HQ=2, H=2, D=8))
    q, k = (torch.cat([x, torch.zeros(1, T, 2, D - 8)], dim=-1) for x in (q, k))
    k[0, :, :, 8:104] += 1e-2 * torch.eye(T)[:, None]
    v = torch.eye(D)[:T, None].expand(1, T, 2, D).contiguous()
    starts, ends = document_bounds((torch.arange(T) >= 50).long()[None])
    leaves = [x.requires_grad_() for x in (q, k, v)]
    out = fused_attention(*leaves, None, torch.tensor([0.5, 0.25]), starts=starts, ends=ends,
                          skip_eps=EPS, deterministic=deterministic)  # fmt: skip
    dq, _, dv = torch.autograd.grad(out, leaves, v.clone())  # g_i = e_i for every query head
    first, _ = alibi_bounds(q, k, torch.tensor([0.5, 0.25]), D**-0.5, EPS, starts)
    return (
        out[0, :, :, :T].transpose(0, 1) != 0,
        dv[0, :, :, :T].permute(1, 2, 0) != 0,
        dq[0, :, :, 8 : 8 + T].transpose(0, 1) != 0,
        first[0],
    )


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic_dq", "dq_pass"])
def test_forward_and_backward_visit_the_same_pairs_whatever_the_tiles(deterministic, monkeypatch):
    """Instrumented through the kernels' outputs (`_visited_pairs`): under 16 x 16, 32 x 16 and
    16 x 32 tiles the forward, the dk/dv pass and dq (atomic, or its own pass) sum over the same
    (query, key) pairs, exactly those `alibi_bounds` allows (documents, per-block reach), and
    the (query tile, key tile) pairs `visited_blocks` counts are those holding one."""
    found = [
        _visited_pairs(tiles, deterministic, monkeypatch)
        for tiles in [(16, 16), (32, 16), (16, 32)]
    ]
    first = found[0][3]
    i, j = torch.arange(96)[:, None], torch.arange(96)[None, :]
    allowed = (first[:, :, None] <= j) & (j <= i)
    assert (~allowed & (j <= i) & (j >= 50) & (i >= 50)).any()  # skipping within a document
    for forward, dkdv, dq, _ in found:
        assert torch.equal(forward, allowed) and torch.equal(dkdv, allowed)
        off_diagonal = i != j  # ds_ij = -p_ij p_ii there; ds_ii = 0 where p_ii = 1
        assert torch.equal(dq & off_diagonal, allowed & off_diagonal)
    tiles = allowed.unflatten(1, (6, 16)).unflatten(3, (6, 16)).any(dim=(2, 4))
    assert visited_blocks(first, 16) == tiles.sum()
