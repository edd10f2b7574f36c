"""Packed documents as the kernels see them: per-token document bounds.

Every token t of row b carries the first index of its document, starts[b, t], and one past its
last, ends[b, t] (int32 [B, T]). Masks need only the starts (key j is visible to query i iff
starts[i] <= j <= i); the loop bounds of the backward pass and the reverse scan need the ends.
Per-token bounds serve both inputs the project uses: the model's doc_ids [B, T] (several
documents per row, any batch) and flash-attention style cu_seqlens (one packed row).
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

from kernels.angles import document_starts


def document_bounds(doc_ids: Tensor) -> tuple[Tensor, Tensor]:
    """(starts, ends) int32 [B, T] of doc_ids [B, T], whose documents are contiguous runs."""
    length = doc_ids.shape[1]
    starts = document_starts(doc_ids)
    ends = length - document_starts(doc_ids.flip(1)).flip(1)
    return starts.to(torch.int32).contiguous(), ends.to(torch.int32).contiguous()


def cu_seqlens_bounds(cu_seqlens: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """(starts, ends) int32 [1, T] of cumulative document lengths [N + 1] (0, ..., T)."""
    if cu_seqlens.dim() != 1 or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"cu_seqlens must be a 1-D int32/int64 tensor of cumulative document lengths, got "
            f"shape {tuple(cu_seqlens.shape)} and dtype {cu_seqlens.dtype}"
        )
    bounds = cu_seqlens.tolist()
    if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != length:
        raise ValueError(
            f"cu_seqlens must run from 0 to the sequence length {length}, got {bounds[:3]}...; "
            "pass the cumulative document lengths (0, len_1, len_1 + len_2, ..., T)"
        )
    if any(b <= a for a, b in itertools.pairwise(bounds)):
        raise ValueError("cu_seqlens must be strictly increasing (every document non-empty)")
    cu = cu_seqlens.to(torch.int64)
    t = torch.arange(length, device=cu.device)
    doc = torch.searchsorted(cu, t, right=True) - 1
    return cu[doc].to(torch.int32)[None], cu[doc + 1].to(torch.int32)[None]
