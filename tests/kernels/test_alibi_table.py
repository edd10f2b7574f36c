"""`kernels.AlibiTable.of_slopes`: ALiBi's table built only when something reads it, equal to
the table built eagerly, so the paths that read the slopes (fused kernel, fla) never build it."""

from __future__ import annotations

import torch
from torch import Tensor

import kernels
from kernels import AlibiTable
from model.positions import alibi_slopes

HQ, T = 4, 50


def _eager(slopes: Tensor) -> AlibiTable:
    return AlibiTable.wrap(-slopes[:, None] * torch.arange(T, dtype=slopes.dtype), slopes)


def test_metadata_and_routing_leave_the_table_unbuilt():
    slopes = alibi_slopes(HQ).float()
    lazy = AlibiTable.of_slopes(slopes, T)
    assert lazy.shape == (HQ, T) and lazy.dtype == torch.float32 and lazy.dim() == 2
    assert lazy.size(-1) == T and not lazy.requires_grad and lazy.device.type == "cpu"
    q = torch.zeros(1, T, HQ, 16)
    assert not kernels.fla_serves(q, q, q, bias=lazy, window=None)
    assert not kernels.fused_serves(q, q, q, bias=lazy)
    assert lazy._table is None


def test_a_read_builds_the_eager_table_as_a_plain_tensor():
    slopes = alibi_slopes(HQ).float()
    lazy, eager = AlibiTable.of_slopes(slopes, T), _eager(slopes)
    for read in (lambda x: x[1], lambda x: x.to(torch.float64), lambda x: x.as_subclass(Tensor)):
        found, expected = read(lazy), read(eager)
        assert type(found) is Tensor and torch.equal(found, expected)
    assert torch.equal(lazy * 2, eager.as_subclass(Tensor) * 2)
    assert lazy.table() is lazy.table()  # built once


def test_blockwise_attention_is_identical_with_the_lazy_table():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, T, h, 16, requires_grad=True) for h in (HQ, 2, 2))
    slopes = alibi_slopes(HQ).float()
    outputs = []
    for bias in (AlibiTable.of_slopes(slopes, T), _eager(slopes)):
        out = kernels.attention(q, k, v, bias=bias, skip_eps=1e-6, block=16)
        outputs.append((out, *torch.autograd.grad(out.square().sum(), (q, k, v))))
    for lazy, eager in zip(*outputs, strict=True):
        assert torch.equal(lazy, eager)
