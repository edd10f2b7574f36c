"""The chunk-parallel angle scan (`kernels.hybrid.scan`): its launch grid, and its float64
carries across many chunks and documents, against the float64 prefix sum.

The precision contract at T = 131072 is test_kernels_hybrid's
test_scan_meets_the_precision_contract_at_131072 (it runs this scan in the interpreter).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from conftest import wrapped

from kernels.hybrid import document_bounds, scan_angles
from kernels.hybrid.scan import CHUNK, scan_grid
from kernels.reference import reference_angles
from training.config import load_config

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SMS_H100 = 132


def test_grid_fills_an_h100_for_the_7b_shape_at_one_sequence():
    """configs/7b_128k.yaml at B = 1: the whole model's key/value heads, and one rank's share
    of them under its sequence parallelism, each give at least one program per SM."""
    cfg = load_config(CONFIGS / "7b_128k.yaml")
    T, H, P = cfg.data.seq_len, cfg.model.kv_heads, cfg.model.head_dim // 2
    chunks, pair_blocks, rows = scan_grid(1, T, H, P)
    assert chunks == T // CHUNK and rows == H
    assert chunks * pair_blocks * rows >= SMS_H100
    per_rank = scan_grid(1, T, H // cfg.train.sequence_parallel, P)
    assert math.prod(per_rank) >= SMS_H100


def _doc_ids_spanning_chunks(length: int) -> torch.Tensor:
    """Row 0: documents ending exactly on chunk edges, one token long, and one spanning four
    chunks; row 1: a single document over every chunk."""
    cuts = [0, CHUNK, CHUNK + 1, 2 * CHUNK - 1, 6 * CHUNK + 5, length]
    lengths = torch.tensor(cuts).diff()
    row = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    return torch.stack((row, torch.zeros(length, dtype=torch.long)))


def test_carries_across_many_chunks_match_the_float64_prefix_sum():
    torch.manual_seed(0)
    T = 8 * CHUNK + 3
    doc_ids = _doc_ids_spanning_chunks(T)
    delta = torch.rand(2, T, 2, 20) * math.pi
    phi = scan_angles(delta.to(DEVICE), *document_bounds(doc_ids.to(DEVICE))).cpu()
    assert phi.min() >= 0 and phi.max() <= 2 * math.pi
    exact = reference_angles(delta, doc_ids)
    assert wrapped(phi.double() - exact).abs().max() < 1e-6


def test_reverse_carries_across_many_chunks_give_the_gradient():
    torch.manual_seed(1)
    T = 8 * CHUNK + 3
    doc_ids = _doc_ids_spanning_chunks(T)
    delta = torch.randn(2, T, 1, 3)
    upstream = torch.randn(2, T, 1, 3, dtype=torch.float64)
    leaf = delta.to(DEVICE).requires_grad_()
    phi = scan_angles(leaf, *document_bounds(doc_ids.to(DEVICE)))
    (grad,) = torch.autograd.grad(phi, leaf, upstream.float().to(DEVICE))
    leaf64 = delta.double().requires_grad_()
    (expected,) = torch.autograd.grad(reference_angles(leaf64, doc_ids), leaf64, upstream)
    torch.testing.assert_close(grad.cpu().double(), expected, rtol=0, atol=1e-5)
