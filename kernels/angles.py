"""Accumulated rotation angles and the half-split rotation R(phi).

The accumulated angle phi_t is the inclusive prefix sum of per-token increments, restarted at
every document start. phi grows linearly with t, so a float32 running sum loses the long-range
angle (about 0.01 rad at t = 1e5). docs/design.md's contract: sum within short chunks in the working
dtype, carry the chunk offsets in float64 reduced mod 2*pi, and rotate by reduced angles.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

TWO_PI = 2 * math.pi
SCAN_CHUNK = 64  # float32 sums within a chunk: about 1e-5 rad worst case at T = 131072


def document_starts(doc_ids: Tensor) -> Tensor:
    """Index of the first token of each token's document, for doc_ids [B, T] (contiguous runs)."""
    t = torch.arange(doc_ids.shape[1], device=doc_ids.device).expand_as(doc_ids)
    is_start = torch.ones_like(doc_ids, dtype=torch.bool)
    is_start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return torch.where(is_start, t, torch.zeros_like(t)).cummax(dim=1).values


def document_positions(doc_ids: Tensor | None, batch: int, length: int, device) -> Tensor:
    """Position of every token inside its document, [B, T] int64 (0 at each document start)."""
    t = torch.arange(length, device=device).expand(batch, length)
    return t if doc_ids is None else t - document_starts(doc_ids)


def accumulate_angles(delta: Tensor, doc_ids: Tensor | None = None) -> Tensor:
    """phi_t = sum of delta_s over s <= t in t's document, reduced to keep float32 precise.

    delta: [B, T, H, P] increments. Returns phi with delta's dtype and shape, congruent mod 2*pi
    to the exact prefix sum, with |phi| <= 2*pi + 2 * SCAN_CHUNK * max|delta|.
    """
    B, T, H, P = delta.shape
    n = -(-T // SCAN_CHUNK)
    padded = torch.nn.functional.pad(delta, (0, 0, 0, 0, 0, n * SCAN_CHUNK - T))
    chunks = padded.view(B, n, SCAN_CHUNK, H, P)
    local = chunks.cumsum(dim=2)
    # Chunk totals from the increments in float64: float32 totals would random-walk.
    totals = chunks.to(torch.float64).sum(dim=2)
    offsets = (totals.cumsum(dim=1) - totals).remainder(TWO_PI)  # exclusive, per chunk
    offsets = offsets.repeat_interleave(SCAN_CHUNK, dim=1)[:, :T]
    local = local.view(B, n * SCAN_CHUNK, H, P)[:, :T]
    if doc_ids is not None:
        # phi_t = S_t - S_{start-1}: subtract the running sum just before the document start,
        # offsets in float64 and chunk-local parts in the working dtype.
        starts = document_starts(doc_ids)
        before = (starts - 1).clamp(min=0)[..., None, None].expand(B, T, H, P)
        inside = (starts > 0)[..., None, None]
        offsets = offsets - torch.where(inside, offsets.gather(1, before), 0.0)
        local = local - torch.where(inside, local.gather(1, before), 0.0)
    return offsets.remainder(TWO_PI).to(delta.dtype) + local


def rotate(x: Tensor, phi: Tensor) -> Tensor:
    """R(phi) x on half-split pairs (x[p], x[p + d/2]); x [B, T, Hx, d], phi [B, T, H, d/2].

    Hx may be a multiple of H (grouped-query heads): head h of x uses phi of head h // (Hx/H).
    """
    if x.shape[2] != phi.shape[2]:
        phi = phi.repeat_interleave(x.shape[2] // phi.shape[2], dim=2)
    cos, sin = phi.cos().to(x.dtype), phi.sin().to(x.dtype)
    a, b = x.chunk(2, dim=-1)
    return torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1)
