"""The blockwise attention paths against the naive float64 references, for every scheme."""

from __future__ import annotations

import pytest
import torch
from conftest import packed_doc_ids, small_model

import kernels
from kernels.path import ut_transform
from kernels.reference import reference_attention
from model import SCHEMES


def _layer_inputs(model, tokens, doc_ids):
    positions = kernels.document_positions(doc_ids, *tokens.shape, tokens.device)
    x = model.blocks[0].attn_norm(model.embed(tokens))
    return model.blocks[0].attn.prepare(x, positions, doc_ids)


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
@pytest.mark.parametrize("block", [8, 64])
def test_blockwise_equals_naive_reference(scheme, block):
    """Odd length 37, grouped-query heads, packed documents, blocks smaller and larger than T."""
    model = small_model(scheme)
    tokens = torch.randint(0, 61, (2, 37))
    doc_ids = packed_doc_ids()
    q, k, v, plan = _layer_inputs(model, tokens, doc_ids)
    fast = kernels.attention(q, k, v, doc_ids=doc_ids, block=block, **plan)
    slow = reference_attention(q, k, v, doc_ids=doc_ids, **plan)
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-10)


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_gradients_equal_naive_reference(scheme):
    """d/dq, d/dk, d/dv and d/d(scheme tensors: angles, bias table, forget gates, PaTH w and
    beta)."""
    model = small_model(scheme)
    tokens = torch.randint(0, 61, (2, 37))
    doc_ids = packed_doc_ids()
    q, k, v, plan = _layer_inputs(model, tokens, doc_ids)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    for key in ("angles", "bias", "gate"):
        if key in plan:
            plan[key] = plan[key].detach().requires_grad_()
            leaves.append(plan[key])
    if "transport" in plan:
        plan["transport"] = tuple(t.detach().requires_grad_() for t in plan["transport"])
        leaves += plan["transport"]
    upstream = torch.randn_like(q)
    grads = []
    for attend in (kernels.attention, reference_attention):
        extra = {"block": 8} if attend is kernels.attention else {}
        out = attend(*leaves[:3], doc_ids=doc_ids, **plan, **extra)
        grads.append(torch.autograd.grad((out * upstream).sum(), leaves))
    for fast, slow in zip(*grads, strict=True):
        torch.testing.assert_close(fast, slow, rtol=0, atol=1e-10)


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_float32_path_tracks_float64_reference(scheme):
    model = small_model(scheme)
    tokens = torch.randint(0, 61, (1, 29))
    q, k, v, plan = _layer_inputs(model, tokens, None)
    slow = reference_attention(q, k, v, **plan)
    plan32 = {
        key: tuple(t.float() for t in value)
        if key == "transport"
        else value.float()
        if torch.is_tensor(value)
        else value
        for key, value in plan.items()
    }
    fast = kernels.attention(q.float(), k.float(), v.float(), block=8, **plan32)
    torch.testing.assert_close(fast.double(), slow, rtol=0, atol=1e-5)


def test_window_skips_far_blocks_and_masks_exactly():
    """A window of 1 leaves each token attending to itself only: the output is v."""
    q, k, v = torch.randn(3, 1, 21, 2, 8, dtype=torch.float64)
    out = kernels.attention(q, k, v, window=1, block=4)
    torch.testing.assert_close(out, v, rtol=0, atol=1e-12)


@pytest.mark.parametrize("other", ["angles", "decay"])
def test_path_transport_refuses_rotations_and_decay(other):
    """No scheme combines them, and reference and fast path would not agree on the order."""
    q, k, v, w = torch.randn(4, 1, 6, 1, 4, dtype=torch.float64)
    extra = {"angles": torch.rand(1, 6, 1, 2), "decay": torch.rand(2)}[other]
    arguments = {"transport": (w, torch.rand(1, 6, 1)), other: extra}
    for attend in (kernels.attention, reference_attention):
        with pytest.raises(ValueError, match="PaTH transport does not combine"):
            attend(q, k, v, **arguments)


def _rotation_matrix(phi: torch.Tensor) -> torch.Tensor:
    """The dense d x d matrix of R(phi) in the half-split layout."""
    P = phi.numel()
    r = torch.zeros(2 * P, 2 * P, dtype=torch.float64)
    for p in range(P):
        c, s = torch.cos(phi[p]), torch.sin(phi[p])
        r[p, p], r[p, p + P], r[p + P, p], r[p + P, p + P] = c, -s, s, c
    return r


def test_rotation_by_accumulated_angles_is_the_relative_rotation():
    """R(phi_i) q . R(phi_j) k == q^T R(phi_j - phi_i) k, with dense rotation matrices."""
    torch.manual_seed(1)
    phi = torch.rand(1, 5, 1, 4, dtype=torch.float64) * 50
    x = torch.randn(1, 5, 1, 8, dtype=torch.float64)
    rotated = kernels.rotate(x, phi)
    for t in range(5):
        torch.testing.assert_close(rotated[0, t, 0], _rotation_matrix(phi[0, t, 0]) @ x[0, t, 0])
    q, k = x[0, 3, 0], x[0, 1, 0]
    direct = q @ _rotation_matrix(phi[0, 1, 0] - phi[0, 3, 0]) @ k
    torch.testing.assert_close(rotated[0, 3, 0] @ kernels.rotate(x, phi)[0, 1, 0], direct)


def test_ut_transform_matches_householder_products():
    torch.manual_seed(2)
    C, D = 7, 5
    w = torch.nn.functional.normalize(torch.randn(C, D, dtype=torch.float64), dim=-1)
    beta = 2 * torch.rand(C, dtype=torch.float64)
    product = torch.eye(D, dtype=torch.float64)
    for t in range(C):
        product = product @ (torch.eye(D, dtype=torch.float64) - beta[t] * torch.outer(w[t], w[t]))
    u = ut_transform(w, beta)
    torch.testing.assert_close(torch.eye(D, dtype=torch.float64) - w.T @ u @ w, product)
    assert torch.equal(u, u.triu())


@pytest.mark.parametrize("window", [None, 30])
def test_path_backward_through_many_steps_equals_reference(window):
    """PaTH's own backward (reverse walk, checkpointed carried queries) over 9 key blocks,
    grouped-query heads, documents, a window and a bias table that learns: every gradient
    equals autograd through the float64 reference."""
    torch.manual_seed(3)
    B, T, HQ, H, D = 1, 72, 2, 1, 6
    q = torch.randn(B, T, HQ, D, dtype=torch.float64)
    k, v, w = torch.randn(3, B, T, H, D, dtype=torch.float64)
    w = torch.nn.functional.normalize(w, dim=-1)
    beta = 2 * torch.rand(B, T, H, dtype=torch.float64)
    bias = -torch.rand(HQ, 1, dtype=torch.float64) * torch.arange(T, dtype=torch.float64) / 10
    doc_ids = torch.tensor([[0] * 50 + [1] * 22])
    leaves = [t.requires_grad_() for t in (q, k, v, w, beta, bias)]
    upstream = torch.randn_like(q)
    grads = []
    for fast in (True, False):
        common = dict(transport=(w, beta), bias=bias, window=window, doc_ids=doc_ids)
        if fast:
            out = kernels.attention(q, k, v, block=8, **common)
        else:
            out = reference_attention(q, k, v, **common)
        grads.append(torch.autograd.grad((out * upstream).sum(), leaves))
    for name, fast, slow in zip(["q", "k", "v", "w", "beta", "bias"], *grads, strict=True):
        torch.testing.assert_close(fast, slow, rtol=0, atol=1e-10, msg=name)
