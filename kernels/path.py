"""PaTH attention, blockwise: logit_ij = q_i^T H_i H_{i-1} ... H_{j+1} k_j, H_t = I - b_t w_t w_t^T.

Within a block of C tokens the product H_1 H_2 ... H_C has the compact (UT) form
I - V^T U V, with V the block's w's as rows and U = (I + diag(b) striu(V V^T))^{-1} diag(b)
upper triangular. Contiguous sub-products use principal sub-blocks of U, so every quantity below
is a masked matrix product:

- queries transported to their block start:  q_in_i = H_1 ... H_i q_i
- keys transported to their block end:       k_out_j = H_C ... H_{j+1} k_j
- the diagonal block's logits:               q_i.k_j - sum_{j<b<=a<=i} (q_i.v_a) U_ba (v_b.k_j)
- a query walking back over a whole block:    q <- H_1 ... H_C q

The diagonal sweep walks every query block back over the key blocks, one block per step.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels.blockwise import DiagonalSweep


def ut_transform(v: Tensor, beta: Tensor) -> Tensor:
    """U with H_1 ... H_C = I - V^T U V, for rows v [..., C, D] and beta [..., C]."""
    C = v.shape[-2]
    strict_upper = torch.triu(v @ v.transpose(-1, -2), diagonal=1)
    eye = torch.eye(C, dtype=v.dtype, device=v.device)
    m = eye + beta[..., :, None] * strict_upper
    return torch.linalg.solve_triangular(m, torch.diag_embed(beta), upper=True, unitriangular=True)


def path_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    w: Tensor,
    beta: Tensor,
    *,
    scale: float | None = None,
    bias: Tensor | None = None,
    window: int | None = None,
    doc_ids: Tensor | None = None,
    block: int = 64,
) -> Tensor:
    """PaTH attention with O(T x block) forward memory. Its backward is autograd's, which keeps
    every step's probabilities: O(T^2) memory when training.

    q [B, T, HQ, D]; k, v, w [B, T, H, D] (w unit-norm); beta [B, T, H] in (0, 2).
    bias, window and doc_ids as in `blockwise_attention`. Returns [B, T, HQ, D].
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    sweep = DiagonalSweep(
        q, k, block=block, doc_ids=doc_ids, bias=bias, window=window, differentiable=True
    )
    n = sweep.n
    qb = sweep.query_blocks(q, scale)
    kb, vb = sweep.blocks(k), sweep.blocks(v)
    # Padding tokens get w = 0, beta = 0: H = I.
    wb = sweep.blocks(w)
    betab = sweep.blocks(beta[..., None])[..., 0]
    u = ut_transform(wb, betab)  # [B, H, n, C, C]

    lower = torch.ones(block, block, dtype=torch.bool, device=q.device).tril()
    qv = torch.einsum("zhgcid,zhcad->zhgcia", qb, wb)  # (q_i . v_a)
    kv = torch.einsum("zhcjd,zhced->zhcje", kb, wb)  # (k_j . v_b)
    q_in = qb - torch.einsum("zhgcie,zhcae,zhcad->zhgcid", qv * lower, u, wb)
    k_out = kb - torch.einsum("zhcje,zhcea,zhcad->zhcjd", kv * ~lower, u, wb)

    diag = torch.einsum("zhgcid,zhcjd->zhgcij", qb, kb) - torch.einsum(
        "zhgcia,zhcea,zhcje->zhgcij", qv * lower, u, kv * ~lower
    )
    sweep.fold(0, diag, vb)
    carried = q_in[:, :, :, 1:]  # query blocks 1.. paired with key blocks 0..
    for s in sweep.steps()[1:]:
        scores = torch.einsum("zhgcid,zhcjd->zhgcij", carried, k_out[:, :, : n - s])
        sweep.fold(s, scores, vb[:, :, : n - s])
        # Walk back over the key block just visited: q <- H_1 ... H_C q of block c - s.
        carried = carried[:, :, :, 1:]
        w_next, u_next = wb[:, :, 1 : n - s], u[:, :, 1 : n - s]
        proj = torch.einsum("zhgcid,zhcad->zhgcia", carried, w_next)
        carried = carried - torch.einsum("zhgcia,zhcea,zhced->zhgcid", proj, u_next, w_next)
    return sweep.unblock(sweep.output()).to(q.dtype)
