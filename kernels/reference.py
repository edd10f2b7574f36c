"""Naive full-matrix references that define the attention family's semantics (docs/design.md).

Everything here is O(T^2) or worse, written straight from the formulas, and meant for float64
checks of the fast paths on short sequences: angles by a plain per-document float64 cumsum,
logits from q_i^T R(phi_j - phi_i) k_j, PaTH from explicit products of Householder matrices.
"""

from __future__ import annotations

import torch
from torch import Tensor


def reference_angles(delta: Tensor, doc_ids: Tensor | None = None) -> Tensor:
    """Inclusive float64 prefix sum of delta [B, T, H, P], restarted at document starts."""
    phi = torch.zeros_like(delta, dtype=torch.float64)
    for b in range(delta.shape[0]):
        running = torch.zeros_like(phi[b, 0])
        for t in range(delta.shape[1]):
            if doc_ids is not None and t > 0 and doc_ids[b, t] != doc_ids[b, t - 1]:
                running = torch.zeros_like(running)
            running = running + delta[b, t].double()
            phi[b, t] = running
    return phi


def _rotate_pairs(x: Tensor, angle: Tensor) -> Tensor:
    """Rotate half-split pairs of x [..., D] by angle [..., D/2] (broadcasting)."""
    a, b = x.chunk(2, dim=-1)
    return torch.cat((a * angle.cos() - b * angle.sin(), a * angle.sin() + b * angle.cos()), -1)


def _householder_path(w: Tensor, beta: Tensor) -> Tensor:
    """M[i, j] = H_i H_{i-1} ... H_{j+1} (identity for i <= j) for w [T, D], beta [T]."""
    T, D = w.shape
    eye = torch.eye(D, dtype=w.dtype)
    rows = []
    for i in range(T):
        row = []
        for j in range(T):
            if i <= j:
                row.append(eye)
            else:  # H_i (H_{i-1} ... H_{j+1})
                row.append((eye - beta[i] * torch.outer(w[i], w[i])) @ rows[i - 1][j])
        rows.append(row)
    return torch.stack([torch.stack(row) for row in rows])


def check_mechanisms(angles: Tensor | None, decay: Tensor | None, transport) -> None:
    """PaTH's transport replaces the rotations and xPos's decay: no scheme combines them."""
    if transport is not None and (angles is not None or decay is not None):
        raise ValueError("PaTH transport does not combine with rotation angles or xPos decay")


def reference_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    angles: Tensor | None = None,
    rotate_values: bool = False,
    bias: Tensor | None = None,
    window: int | None = None,
    decay: Tensor | None = None,
    transport: tuple[Tensor, Tensor] | None = None,
    gate: Tensor | None = None,
    doc_ids: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Causal attention of the whole family from a full T x T matrix, in q's dtype.

    Arguments as in `kernels.attention`; angles are the accumulated phi [B, T, H, D/2]; gate
    the cumulative log forget gates F [B, T, HQ] (logit_ij + F_i - F_j).
    """
    check_mechanisms(angles, decay, transport)
    B, T, HQ, D = q.shape
    G = HQ // k.shape[2]
    k, v = k.repeat_interleave(G, dim=2), v.repeat_interleave(G, dim=2)
    scale = D**-0.5 if scale is None else scale
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    out = torch.empty_like(q)
    for b in range(B):
        for h in range(HQ):
            qh, kh, vh = q[b, :, h], k[b, :, h], v[b, :, h]
            if angles is not None:
                phi = angles[b, :, h // G]
                relative = phi[None, :, :] - phi[:, None, :]  # [i, j, P]: phi_j - phi_i
                k_ij = _rotate_pairs(kh[None, :, :], relative)  # R(phi_j - phi_i) k_j
            else:
                k_ij = kh[None, :, :].expand(T, T, D)
            if transport is not None:
                w, beta = transport[0][b, :, h // G], transport[1][b, :, h // G]
                k_ij = torch.einsum("ijde,je->ijd", _householder_path(w, beta), kh)
            pair_terms = qh[:, None, :] * k_ij  # [i, j, D]
            if decay is not None:
                pair_terms = pair_terms * torch.exp(torch.cat((decay, decay)) * (i - j)[..., None])
            logits = pair_terms.sum(-1) * scale
            if bias is not None:
                logits = logits + bias[h][(i - j).clamp(min=0)]
            if gate is not None:
                logits = logits + gate[b, :, h, None] - gate[b, None, :, h]
            keep = j <= i
            if window is not None:
                keep = keep & (i - j < window)
            if doc_ids is not None:
                keep = keep & (doc_ids[b][:, None] == doc_ids[b][None, :])
            attn = logits.masked_fill(~keep, float("-inf")).softmax(dim=-1)
            if angles is not None and rotate_values:
                v_ij = _rotate_pairs(vh[None, :, :], relative)  # R(phi_j - phi_i) v_j
                out[b, :, h] = torch.einsum("ij,ijd->id", attn, v_ij)
            else:
                out[b, :, h] = attn @ vh
    return out
