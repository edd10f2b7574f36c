"""PaTH on fla (`kernels.path_fla`): the routing, and the argument translation fed to fla's own
pure-PyTorch reference (`fla.ops.path_attn.naive_path_attn`, float32 inside) against
`kernels.reference` in float64, for path, path_alibi and a forget gate (path_fox)."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from fla.ops.path_attn.naive import naive_path_attn

import kernels
from kernels import path_fla
from kernels.reference import reference_attention
from model.positions import alibi_slopes

B, T, HQ, H, D = 2, 24, 4, 2, 16
SCALE = D**-0.5


def _varlen_naive(q, k, v, w, beta, g, scale, cu_seqlens):
    """fla's `parallel_path_attn` contract on its naive reference (8-token chunks, so the
    transport crosses chunks): cu_seqlens rows one by one."""
    g = torch.zeros(q.shape[:3], dtype=torch.float32) if g is None else g
    if cu_seqlens is None:
        return naive_path_attn(q, k, v, w, beta, g, scale, chunk_size=8), None
    pieces = [
        naive_path_attn(*(x[:, a:b] for x in (q, k, v, w, beta, g)), scale, chunk_size=8)
        for a, b in itertools.pairwise(cu_seqlens.tolist())
    ]
    return torch.cat(pieces, dim=1), None


def _inputs(seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, h, D, generator=gen) for h in (HQ, H, H))
    w = F.normalize(torch.randn(B, T, H, D, generator=gen), dim=-1)
    beta = 2 * torch.sigmoid(torch.randn(B, T, H, generator=gen))
    log_forget = F.logsigmoid(torch.randn(B, T, HQ, generator=gen) + 2)
    doc_ids = torch.tensor([[0] * 7 + [1] * 16 + [2], [4] * T])
    q, k, v, w, beta = (x.double() for x in (q, k, v, w, beta))
    gate = log_forget.double().cumsum(1)
    return dict(q=q, k=k, v=v, w=w, beta=beta, gate=gate, doc_ids=doc_ids)


@pytest.mark.parametrize("scheme", ["path", "path_alibi", "path_fox"])
@pytest.mark.parametrize("documents", [False, True])
def test_translation_on_fla_reference_equals_kernels_reference(monkeypatch, scheme, documents):
    x = _inputs(seed=len(scheme) + documents)
    slopes = alibi_slopes(HQ) if scheme == "path_alibi" else None
    gate = x["gate"] if scheme == "path_fox" else None
    doc_ids = x["doc_ids"] if documents else None
    monkeypatch.setattr(path_fla, "_kernel", lambda: _varlen_naive)
    out = path_fla.fla_path_attention(
        x["q"], x["k"], x["v"], x["w"], x["beta"], scale=SCALE, slopes=slopes, gate=gate,
        doc_ids=doc_ids,
    )  # fmt: skip
    bias = None if slopes is None else -slopes[:, None] * torch.arange(T).double()
    expected = reference_attention(
        x["q"], x["k"], x["v"], transport=(x["w"], x["beta"]), bias=bias, gate=gate,
        doc_ids=doc_ids, scale=SCALE,
    )  # fmt: skip
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, expected, rtol=0, atol=2e-5)
    # Without the translation's 1 / scale on the gate, fla would compute another attention.
    if slopes is not None:
        wrong = reference_attention(
            x["q"], x["k"], x["v"], transport=(x["w"], x["beta"]), bias=bias * SCALE,
            doc_ids=doc_ids, scale=SCALE,
        )  # fmt: skip
        assert (out - wrong).abs().max() > 1e-2


def test_packed_cu_seqlens_cut_at_every_document_and_row_start():
    doc_ids = torch.tensor([[0, 0, 1, 1, 1], [7, 7, 7, 8, 9]])
    assert path_fla.packed_cu_seqlens(doc_ids).tolist() == [0, 2, 5, 8, 9, 10]


def _like(device: str, head_dim: int, dtype: torch.dtype) -> SimpleNamespace:
    """A stand-in for a tensor on `device` (no GPU here): what the routing reads."""
    return SimpleNamespace(device=torch.device(device), shape=(1, 8, 4, head_dim), dtype=dtype)


@pytest.mark.parametrize("device", ["cuda", "cpu"])
@pytest.mark.parametrize("head_dim", [8, 16, 64, 96, 128, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fla_serves_exactly_cuda_with_its_head_dims_and_dtypes(
    monkeypatch, device, head_dim, dtype
):
    monkeypatch.setattr(kernels, "fla_installed", lambda: True)
    q = _like(device, head_dim, dtype)
    expected = device == "cuda" and head_dim in (16, 32, 64, 128) and dtype != torch.float32
    assert kernels.fla_serves(q, q, q, bias=None, window=None) == expected
    slopes = alibi_slopes(4)
    alibi = kernels.AlibiTable.wrap(-slopes[:, None] * torch.arange(8.0), slopes)
    assert kernels.fla_serves(q, q, q, bias=alibi, window=None) == expected
    # A learned bias table or a window: the blockwise path.
    learned = torch.zeros(4, 8, requires_grad=True)
    assert not kernels.fla_serves(q, q, q, bias=learned, window=None)
    assert not kernels.fla_serves(q, q, q, bias=None, window=4)
    # Deterministic training: fla's backward adds with atomics.
    assert not kernels.fla_serves(q, q, q, bias=None, window=None, deterministic=True)


def test_without_fla_installed_cuda_runs_the_blockwise_path(monkeypatch):
    monkeypatch.setattr(kernels, "fla_installed", lambda: False)
    q = _like("cuda", 64, torch.bfloat16)
    assert not kernels.fla_serves(q, q, q, bias=None, window=None)


def test_attention_routes_path_alibi_to_fla(monkeypatch):
    """kernels.attention on a device where fla serves: fla's call, with the table's slopes."""
    x = _inputs(seed=7)
    slopes = alibi_slopes(HQ).double()
    alibi = kernels.AlibiTable.wrap(-slopes[:, None] * torch.arange(T).double(), slopes)
    calls = []

    def recording(**args):
        calls.append(args)
        return _varlen_naive(**args)

    monkeypatch.setattr(kernels, "FLA_DEVICES", ("cpu",))
    monkeypatch.setattr(kernels, "FLA_DTYPES", (torch.float64,))
    monkeypatch.setattr(kernels, "fla_installed", lambda: True)
    monkeypatch.setattr(path_fla, "_kernel", lambda: recording)
    out = kernels.attention(
        x["q"], x["k"], x["v"], transport=(x["w"], x["beta"]), bias=alibi, doc_ids=x["doc_ids"]
    )
    assert len(calls) == 1 and calls[0]["cu_seqlens"] is not None
    expected = reference_attention(
        x["q"], x["k"], x["v"], transport=(x["w"], x["beta"]), bias=alibi, doc_ids=x["doc_ids"]
    )
    torch.testing.assert_close(out, expected, rtol=0, atol=2e-5)
