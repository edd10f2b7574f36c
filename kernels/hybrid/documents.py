"""Packed documents as the kernels see them: per-token document bounds.

Every token t of row b carries the first index of its document, starts[b, t], and one past its
last, ends[b, t] (int32 [B, T]). Masks need only the starts (key j is visible to query i iff
starts[i] <= j <= i); the loop bounds of the backward pass and the reverse scan need the ends.
Per-token bounds serve both inputs the project uses: the model's doc_ids [B, T] (several
documents per row, any batch) and flash-attention style cu_seqlens (one packed row).
Neither function synchronises with the device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels.angles import document_starts


def document_bounds(doc_ids: Tensor) -> tuple[Tensor, Tensor]:
    """(starts, ends) int32 [B, T] of doc_ids [B, T], whose documents are contiguous runs.

    Computed once per doc_ids tensor: the result is kept on it until it is modified in place
    (inference tensors, which count no modifications, keep nothing), so the angle scan and the
    attention of every layer of a forward pass, which share the model's doc_ids, reuse one
    computation.
    """
    version = None if doc_ids.is_inference() else doc_ids._version
    kept = getattr(doc_ids, "_document_bounds", None)
    if version is not None and kept is not None and kept[0] == version:
        return kept[1]
    length = doc_ids.shape[1]
    starts = document_starts(doc_ids)
    ends = length - document_starts(doc_ids.flip(1)).flip(1)
    bounds = starts.to(torch.int32).contiguous(), ends.to(torch.int32).contiguous()
    if version is not None:
        doc_ids._document_bounds = (version, bounds)
    return bounds


def _check(ok: Tensor, message: str) -> None:
    """Raise ValueError(message) unless ok; on a device, asynchronously (no synchronisation):
    a failure there stops the next kernel launch with the message."""
    if ok.device.type == "cpu":
        if not ok:
            raise ValueError(message)
    else:
        torch._assert_async(ok, message)


def cu_seqlens_bounds(cu_seqlens: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """(starts, ends) int32 [1, T] of cumulative document lengths [N + 1] (0, ..., T)."""
    if cu_seqlens.dim() != 1 or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"cu_seqlens must be a 1-D int32/int64 tensor of cumulative document lengths, got "
            f"shape {tuple(cu_seqlens.shape)} and dtype {cu_seqlens.dtype}"
        )
    if cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must hold at least 0 and T, got {cu_seqlens.numel()} values")
    cu = cu_seqlens.to(torch.int64)
    _check(
        (cu[0] == 0) & (cu[-1] == length),
        f"cu_seqlens must run from 0 to the sequence length {length}; pass the cumulative "
        "document lengths (0, len_1, len_1 + len_2, ..., T)",
    )
    _check(
        (cu.diff() > 0).all(), "cu_seqlens must be strictly increasing (every document non-empty)"
    )
    t = torch.arange(length, device=cu.device)
    doc = torch.searchsorted(cu, t, right=True) - 1
    return cu[doc].to(torch.int32)[None], cu[doc + 1].to(torch.int32)[None]
