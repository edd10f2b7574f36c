"""Attention diagnostics and the theoretical receptive field against independent references:
full float64 attention matrices from kernels.reference, closed forms, direct numerical sums."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import packed_doc_ids, small_model

from kernels.diagnostics import PATH_UNSUPPORTED, attention_statistics
from kernels.reference import reference_attention
from model.positions import alibi_slopes
from model.receptive_field import (
    converges,
    log_terms,
    receptive_field,
    receptive_field_limit,
)
from model.schemes import DistanceBias


def _pad_pairs(x: torch.Tensor, width: int) -> torch.Tensor:
    """x [..., D] in the half-split pair layout, zero-padded to `width` keeping every pair."""
    a, b = x.chunk(2, dim=-1)
    zeros = x.new_zeros(*x.shape[:-1], (width - x.shape[-1]) // 2)
    return torch.cat((a, zeros, b, zeros), dim=-1)


def reference_weights(
    q, k, *, angles=None, decay=None, scale=None, rotate_values=False, **kwargs
) -> torch.Tensor:
    """The full attention matrix [B, HQ, i, j] of kernels.reference: values are one-hot
    positions (never rotated), so the output rows are the attention rows; the head dim is
    padded (pairs kept, scale unchanged) to hold them."""
    B, T, _, D = q.shape
    width = max(D, T + T % 2)
    if angles is not None:
        angles = torch.cat((angles, angles.new_zeros(*angles.shape[:-1], (width - D) // 2)), -1)
    if decay is not None:
        decay = torch.cat((decay, decay.new_zeros((width - D) // 2)))
    one_hot = torch.eye(T, width, dtype=q.dtype)[None, :, None, :].expand(B, T, k.shape[2], width)
    out = reference_attention(
        _pad_pairs(q, width),
        _pad_pairs(k, width),
        one_hot,
        angles=angles,
        decay=decay,
        scale=D**-0.5 if scale is None else scale,
        **kwargs,
    )
    return out[..., :T].permute(0, 2, 1, 3)


def _captured(model, tokens, doc_ids=None) -> list[tuple]:
    """Each layer's (q, k, kwargs) as the model hands them to kernels.attention."""
    seen = []
    with model.attention_probe(lambda layer, q, k, v, kwargs: seen.append((q, k, kwargs))):
        model(tokens, doc_ids)
    return seen


@pytest.mark.parametrize(
    ("scheme", "packed"),
    [
        ("alibi", False),  # bias only
        ("kerple_log", True),  # learned bias, packed documents
        ("rope", False),  # rotation
        ("local", True),  # rotation and a sliding window (11 < T)
        ("xpos", False),  # rotation and per-pair decay
        ("hybrid", True),  # learned rotations of q, k, v and ALiBi
    ],
)
def test_blockwise_statistics_equal_the_full_float64_matrix(scheme, packed):
    model = small_model(scheme)  # grouped-query heads (4 query heads on 2), block 8
    doc_ids = packed_doc_ids() if packed else None
    tokens = torch.randint(
        0, model.cfg.vocab_size, (2, 37), generator=torch.Generator().manual_seed(1)
    )
    for q, k, kwargs in _captured(model, tokens, doc_ids):
        stats = attention_statistics(q, k, **kwargs)
        # The statistics are exact: the model's tile and skipping are not the reference's.
        kwargs = {key: value for key, value in kwargs.items() if key not in ("block", "skip_eps")}
        weights = reference_weights(q, k, **kwargs)  # [B, HQ, i, j]
        distance = torch.arange(37)[:, None] - torch.arange(37)[None, :]
        mass = torch.stack([(weights * (distance == n)).sum((0, 2, 3)) for n in range(37)], -1)
        entropy = -torch.special.xlogy(weights, weights).sum((0, 2, 3))
        torch.testing.assert_close(stats.mass, mass, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(stats.entropy, entropy, rtol=1e-10, atol=1e-12)
        assert stats.queries == 2 * 37
        torch.testing.assert_close(stats.mass.sum(-1), torch.full((4,), 74.0, dtype=torch.float64))


def test_alibi_mass_of_zero_queries_and_keys_is_the_normalised_geometric_series():
    T, H, D = 50, 4, 8
    slopes = alibi_slopes(H).double()
    bias = -slopes[:, None] * torch.arange(T, dtype=torch.float64)
    zeros = torch.zeros(1, T, H, D, dtype=torch.float64)
    stats = attention_statistics(zeros, zeros, bias=bias, block=16)
    for h, m in enumerate(slopes.tolist()):
        r = math.exp(-m)
        # Query i sees distances 0..i with weights r^n (1 - r) / (1 - r^(i+1)).
        expected = [sum(r**n * (1 - r) / (1 - r ** (i + 1)) for i in range(n, T)) for n in range(T)]
        torch.testing.assert_close(stats.mass[h], torch.tensor(expected, dtype=torch.float64))


def test_path_statistics_are_refused_with_the_reason():
    model = small_model("path")
    q, k, kwargs = _captured(model, torch.zeros(1, 9, dtype=torch.long))[0]
    with pytest.raises(NotImplementedError, match="Householder"):
        attention_statistics(q, k, **kwargs)
    assert "PaTH" in PATH_UNSUPPORTED


def _direct_field(term, eps: float, length: int) -> int:
    """The fewest nearest keys holding 1 - eps of sum_{n < length} term(n), by a plain loop."""
    total = math.fsum(term(n) for n in range(length))
    partial = 0.0
    for t in range(length):
        partial += term(t)
        if partial >= (1 - eps) * total:
            return t + 1
    raise AssertionError("unreachable")


TERMS = {
    "alibi": lambda m: lambda n: math.exp(-m * n),
    "type1": lambda m: lambda n: 1 / (1 + m * n),
    "type2": lambda m: lambda n: 1 / ((3 + m * n) * math.log(3 + m * n)),
}


@pytest.mark.parametrize("kind", sorted(TERMS))
@pytest.mark.parametrize("eps", [0.1, 0.01])
def test_receptive_field_at_a_length_is_the_direct_partial_sum(kind, eps):
    bias = DistanceBias(kind, 4, 8)
    for length in (128, 4096):
        found = receptive_field(log_terms(bias, length), eps).tolist()
        expected = [_direct_field(TERMS[kind](m), eps, length) for m in bias.slopes.tolist()]
        assert found == expected, (kind, length)


@pytest.mark.parametrize("eps", [0.1, 0.01])
def test_alibi_receptive_field_limit_is_the_geometric_closed_form(eps):
    bias = DistanceBias("alibi", 8, 8)
    keys, resolved = receptive_field_limit(bias, eps)
    assert resolved.all() and converges(bias).all()
    # 1 - r^t >= 1 - eps with r = exp(-m): t = ceil(ln(1/eps) / m); and by a direct sum.
    for m, found in zip(bias.slopes.tolist(), keys.tolist(), strict=True):
        assert found == math.ceil(math.log(1 / eps) / m)
        assert found == _direct_field(TERMS["alibi"](m), eps, 20 * found)


@pytest.mark.parametrize("kind", ["type1", "type2", "sandwich", "kerple_log"])
def test_diverging_series_are_reported_as_such(kind):
    bias = DistanceBias(kind, 4, 8)  # kerple_log starts as type1: (1 + m n)^-1, harmonic
    assert not converges(bias).any()
    _, resolved = receptive_field_limit(bias, 0.1)
    assert not resolved.any()
    if kind != "sandwich":  # its field grows with the context, without bound
        fields = [receptive_field(log_terms(bias, n), 0.1) for n in (2**8, 2**12, 2**16)]
        assert (fields[0] < fields[1]).all() and (fields[1] < fields[2]).all()


def test_kerple_log_with_exponent_above_one_converges_to_the_direct_sum():
    bias = DistanceBias("kerple_log", 2, 8)
    with torch.no_grad():
        bias.r1.copy_(torch.tensor([3.0, 5.0]))  # softplus: r1 = 3.05, 5.01
        bias.r2.copy_(torch.tensor([0.0, -1.0]))
    assert converges(bias).all()
    keys, resolved = receptive_field_limit(bias, 0.01)
    assert resolved.all()
    r1, r2 = (
        torch.nn.functional.softplus(bias.r1).tolist(),
        torch.nn.functional.softplus(bias.r2).tolist(),
    )
    for a, b, found in zip(r1, r2, keys.tolist(), strict=True):
        assert found == _direct_field(lambda n, a=a, b=b: (1 + b * n) ** -a, 0.01, 2**21)
