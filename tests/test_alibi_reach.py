"""Skipping what ALiBi provably zeroes (`kernels.alibi_reach`): the bound against the exact
dropped mass, and the skipping paths against the same attention without skipping."""

from __future__ import annotations

import pytest
import torch

import kernels
from kernels import AlibiTable
from kernels.alibi_reach import alibi_reach
from kernels.blockwise import DiagonalSweep
from kernels.reference import reference_attention
from model.schemes import alibi_slopes

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
    upstream = torch.randn_like(q)
    results = []
    for eps in (EPS, 0.0):
        out = kernels.attention(
            *leaves[:3], angles=angles, rotate_values=True, bias=bias, doc_ids=doc_ids,
            skip_eps=eps, block=block,
        )  # fmt: skip
        results.append((out, *torch.autograd.grad((out * upstream).sum(), leaves)))
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
