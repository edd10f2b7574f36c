"""docs/design.md's precision contract for the accumulated angles, at T = 131072."""

from __future__ import annotations

import math

import torch
from conftest import near_and_far_pairs, wrapped

from kernels import accumulate_angles
from kernels.reference import reference_angles

T = 131072


def test_relative_angles_within_1e4_rad_at_131072():
    torch.manual_seed(0)
    delta = torch.rand(1, T, 2, 8) * math.pi  # U(0, pi), float32
    phi = accumulate_angles(delta).double()
    exact = delta.double().cumsum(dim=1)
    assert wrapped(phi - exact).abs().max() < 2e-5
    # Relative angles between near and far pairs, the quantity attention sees.
    i, j = near_and_far_pairs(T)
    relative_error = wrapped((phi[:, i] - phi[:, j]) - (exact[:, i] - exact[:, j]))
    assert relative_error.abs().max() < 1e-4
    # A plain float32 running sum, what the contract rules out, is far worse.
    naive = delta.cumsum(dim=1).double()
    assert wrapped(naive - exact).abs().max() > 1e-3


def test_restarts_at_document_boundaries():
    torch.manual_seed(1)
    doc_ids = torch.tensor([[0] * 7 + [1] * 40 + [2] * 3 + [3] * 21, [5] * 71])
    delta = torch.rand(2, 71, 3, 4, dtype=torch.float64) * math.pi
    phi = accumulate_angles(delta, doc_ids)
    torch.testing.assert_close(
        wrapped(phi - reference_angles(delta, doc_ids)), torch.zeros_like(phi), rtol=0, atol=1e-12
    )


def test_restarts_keep_precision_at_131072():
    torch.manual_seed(2)
    delta = torch.rand(1, T, 1, 4) * math.pi
    doc_ids = (torch.arange(T) >= 100_003).long()[None]
    phi = accumulate_angles(delta, doc_ids).double()
    exact = delta.double().cumsum(dim=1)
    exact[:, 100_003:] -= exact[:, 100_002]
    assert wrapped(phi - exact).abs().max() < 2e-5


def test_gradient_is_the_reverse_prefix_sum():
    delta = torch.rand(2, 37, 2, 3, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(2, 37, 2, 3, dtype=torch.float64)
    (accumulate_angles(delta) * upstream).sum().backward()
    reverse_cumsum = upstream.flip(1).cumsum(1).flip(1)
    torch.testing.assert_close(delta.grad, reverse_cumsum)


def test_gradient_restarts_at_document_boundaries():
    """Each increment's gradient sums the upstream gradient over its own document's rest only."""
    torch.manual_seed(3)
    doc_ids = torch.tensor([[0] * 7 + [1] * 40 + [2] * 3 + [3] * 21, [5] * 71])
    delta = torch.rand(2, 71, 2, 3, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(2, 71, 2, 3, dtype=torch.float64)
    (grad,) = torch.autograd.grad(accumulate_angles(delta, doc_ids), delta, upstream)
    leaf = delta.detach().requires_grad_()
    (expected,) = torch.autograd.grad(reference_angles(leaf, doc_ids), leaf, upstream)
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-12)
