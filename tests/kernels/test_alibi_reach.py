"""Skipping what ALiBi or a forget gate provably zeroes (`kernels.alibi_reach`): the bound
against the exact dropped mass, and the skipping paths against the same attention without
skipping."""

from __future__ import annotations

import math

import pytest
import torch

import kernels
from kernels import AlibiTable
from kernels.alibi_reach import alibi_reach, gate_reach
from kernels.blockwise import DiagonalSweep
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
