"""bench.attention_cost's model of the fused kernel's FLOPs and HBM bytes, against the same
quantities counted on the real kernels in Triton's interpreter, and its claims against
FlashAttention-2."""

from __future__ import annotations

import pytest
import torch

import kernels.hybrid.attention as fused
from bench.attention_cost import Shape, hybrid_passes, interpreted_traffic, summary
from kernels.hybrid import fused_attention

pytestmark = pytest.mark.skipif(
    not fused.INTERPRETING, reason="counts what the interpreted kernels load, store and multiply"
)


@pytest.mark.parametrize("rotate_values", [True, False])
def test_model_equals_the_interpreted_kernels_traffic(rotate_values):
    """Forward and backward of the fused kernel (the angle scan aside): matmul FLOPs and bytes
    loaded, stored and atomically added, exactly as the model counts them."""
    torch.manual_seed(0)
    B, T, HQ, H, d, tile = 1, 64, 4, 2, 32, fused._configs([])[0].kwargs["BLOCK_M"]
    q = torch.randn(B, T, HQ, d, requires_grad=True)
    k, v = (torch.randn(B, T, H, d, requires_grad=True) for _ in range(2))
    angles = torch.rand(B, T, H, d // 2, requires_grad=True)
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625])
    with interpreted_traffic() as forward:
        out = fused_attention(q, k, v, angles, slopes, rotate_values=rotate_values)
    with interpreted_traffic() as backward:
        out.backward(torch.randn_like(out))
    shape = Shape(B, T, HQ, H, d, 4, (tile, tile), (tile, tile), rotate_values)
    kernels = [p for p in hybrid_passes(shape) if p.triton and not p.name.startswith("scan")]
    for phase, measured in (("fwd", forward), ("bwd", backward)):
        model = [p for p in kernels if p.phase == phase]
        assert measured["flops"] == sum(p.flops for p in model), phase
        assert measured["bytes"] == sum(p.bytes for p in model), phase


@pytest.mark.parametrize("length", [8192, 32768, 131072])
@pytest.mark.parametrize("kv_heads", [8, 32])
def test_five_backward_matmuls_and_bytes_close_to_flash_attention_2(length, kv_heads):
    """The 7b shape (32 query heads, d = 128, bfloat16): the backward does FlashAttention-2's
    five matmuls per causal tile, no more, and moves at most 25% more bytes than it."""
    row = summary(Shape(1, length, 32, kv_heads, 128))
    assert row["bwd_matmuls"] == row["fa2_bwd_matmuls"] == 5
    assert row["fwd_matmuls"] == row["fa2_fwd_matmuls"] == 2
    assert row["bwd_flops"] == row["fa2_bwd_flops"]
    assert 0 < row["extra_bytes_vs_fa2"] <= 0.25
