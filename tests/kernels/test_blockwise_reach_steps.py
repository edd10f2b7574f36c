"""The blockwise path takes the reach (`kernels.alibi_reach`) to the host once per call: its
backward reuses the forward's steps per head instead of reading the reach again."""

from __future__ import annotations

import torch

from kernels.alibi_reach import alibi_reach
from kernels.blockwise import DiagonalSweep, blockwise_attention


def test_backward_reuses_the_forwards_steps(monkeypatch):
    torch.manual_seed(0)
    T, block = 96, 16
    q, k, v = (torch.randn(1, T, h, 8, requires_grad=True) for h in (4, 2, 2))
    slopes = torch.tensor([1.0, 0.5, 2.0, 1.0])  # steep: far blocks are skipped
    bias = -slopes[:, None] * torch.arange(T)
    reach = alibi_reach(q, k, slopes, 8**-0.5, 1e-6)
    reads = []
    real = DiagonalSweep._steps_needed

    def counted(self, *args):
        reads.append(real(self, *args))
        return reads[-1]

    monkeypatch.setattr(DiagonalSweep, "_steps_needed", counted)
    out = blockwise_attention(q, k, v, bias=bias, reach=reach, block=block)
    out.square().sum().backward()
    assert len(reads) == 1 and min(reads[0]) < T // block  # one read; steps skipped
    # The gradients are those of a call that reads the reach again in its backward.
    grads = [x.grad.clone() for x in (q, k, v)]
    monkeypatch.setattr(DiagonalSweep, "_steps_needed", real)
    for x in (q, k, v):
        x.grad = None
    blockwise_attention(q, k, v, bias=bias, reach=reach, block=block).square().sum().backward()
    for x, expected in zip((q, k, v), grads, strict=True):
        assert torch.equal(x.grad, expected)
