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

The backward pass saves only the inputs, the output and the log-sum-exp (O(T x D)), like
flash-attention's. A query's gradient collects from far to near, so the backward walks the
steps in reverse, through the transport's adjoint; the carried queries it needs are
recomputed from checkpoints kept every ~sqrt(steps) steps, so its working memory is
O(T x D x sqrt(T / block)) and its cost about two forward passes.
"""

from __future__ import annotations

import math

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


def _blocked(
    sweep: DiagonalSweep, q: Tensor, k: Tensor, w: Tensor, beta: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per block: (w's rows, U, queries transported to their block start, keys transported
    to their block end, the diagonal block's raw scores)."""
    block = sweep.block
    qb, kb = sweep.query_blocks(q, scale), sweep.blocks(k)
    # Padding tokens get w = 0, beta = 0: H = I.
    wb = sweep.blocks(w)
    u = ut_transform(wb, sweep.blocks(beta[..., None])[..., 0])  # [B, H, n, C, C]
    lower = torch.ones(block, block, dtype=torch.bool, device=q.device).tril()
    qv = torch.einsum("zhgcid,zhcad->zhgcia", qb, wb)  # (q_i . v_a)
    kv = torch.einsum("zhcjd,zhced->zhcje", kb, wb)  # (k_j . v_b)
    q_in = qb - torch.einsum("zhgcie,zhcae,zhcad->zhgcid", qv * lower, u, wb)
    k_out = kb - torch.einsum("zhcje,zhcea,zhcad->zhcjd", kv * ~lower, u, wb)
    diag = torch.einsum("zhgcid,zhcjd->zhgcij", qb, kb) - torch.einsum(
        "zhgcia,zhcea,zhcje->zhgcij", qv * lower, u, kv * ~lower
    )
    return wb, u, q_in, k_out, diag


def _walk_back(carried: Tensor, w: Tensor, u: Tensor) -> Tensor:
    """Queries [.., c, i, D] carried over whole blocks with rows w [.., c, C, D] and U:
    x <- H_1 ... H_C x = x - w^T U^T (w x)."""
    proj = torch.einsum("zhgcid,zhcad->zhgcia", carried, w)
    return carried - torch.einsum("zhgcia,zhcea,zhced->zhgcid", proj, u, w)


def _walk_back_adjoint(
    carried: Tensor, w: Tensor, u: Tensor, grad: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of `_walk_back(carried, w, u)` for the upstream `grad`: (d carried, d w, d u)."""
    proj = torch.einsum("zhgcid,zhcad->zhgcia", carried, w)  # P = x w^T
    back = torch.einsum("zhgcid,zhced->zhgcie", grad, w)  # R = g w^T
    through_u = torch.einsum("zhgcie,zhcea->zhgcia", back, u)  # R U
    proj_u = torch.einsum("zhgcia,zhcea->zhgcie", proj, u)  # P U^T
    dcarried = grad - torch.einsum("zhgcia,zhcad->zhgcid", through_u, w)
    dw = -torch.einsum("zhgcia,zhgcid->zhcad", through_u, carried) - torch.einsum(
        "zhgcie,zhgcid->zhced", proj_u, grad
    )
    du = -torch.einsum("zhgcie,zhgcia->zhcea", back, proj)
    return dcarried, dw, du


class _PathAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, w, beta, bias, gate, doc_ids, scale, window, block):
        sweep = DiagonalSweep(
            q, k, block=block, doc_ids=doc_ids, bias=bias, window=window, gate=gate
        )
        n = sweep.n
        wb, u, q_in, k_out, diag = _blocked(sweep, q, k, w, beta, scale)
        vb = sweep.blocks(v)
        sweep.fold(0, diag, vb)
        carried = q_in[:, :, :, 1:]  # query blocks 1.. paired with key blocks 0..
        for s in sweep.steps()[1:]:
            scores = torch.einsum("zhgcid,zhcjd->zhgcij", carried, k_out[:, :, : n - s])
            sweep.fold(s, scores, vb[:, :, : n - s])
            # Walk back over the key block just visited, c - s, for query blocks s + 1..
            carried = _walk_back(carried[:, :, :, 1:], wb[:, :, 1 : n - s], u[:, :, 1 : n - s])
        out = sweep.unblock(sweep.output()).to(q.dtype)
        ctx.save_for_backward(q, k, v, w, beta, bias, gate, doc_ids, out, sweep.log_sum_exp())
        ctx.scale, ctx.window, ctx.block = scale, window, block
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, w, beta, bias, gate, doc_ids, out, lse = ctx.saved_tensors
        sweep = DiagonalSweep(
            q, k, block=ctx.block, doc_ids=doc_ids, bias=bias, window=ctx.window, gate=gate
        )
        n, steps = sweep.n, len(sweep.steps())
        leaves = [x.detach().requires_grad_() for x in (q, k, w, beta)]
        with torch.enable_grad():
            blocked = _blocked(sweep, *leaves, ctx.scale)
        wb, u, q_in, k_out, diag = (x.detach() for x in blocked)
        vb = sweep.blocks(v)
        dob, row_dot = sweep.output_gradient(dout, out)
        dbias = torch.zeros_like(sweep.bias) if ctx.needs_input_grad[5] else None
        dgate = torch.zeros_like(sweep.gate_local) if ctx.needs_input_grad[6] else None
        dv, dk_out, dwb, du = (torch.zeros_like(x) for x in (vb, k_out, wb, u))

        def step_gradients(s: int, carried: Tensor) -> Tensor:
            """Step s >= 1's gradients into dv, dk_out (and dbias); returns d carried."""
            keys = k_out[:, :, : n - s]
            dscores, dvalues = sweep.score_gradients(
                s, torch.einsum("zhgcid,zhcjd->zhgcij", carried, keys), vb[:, :, : n - s],
                dob[:, :, :, s:], lse[:, :, :, s:], row_dot[:, :, :, s:], dbias=dbias,
                dgate=dgate,
            )  # fmt: skip
            dv[:, :, : n - s] += dvalues
            dk_out[:, :, : n - s] += torch.einsum("zhgcij,zhgcid->zhcjd", dscores, carried)
            return torch.einsum("zhgcij,zhcjd->zhgcid", dscores, keys)

        # Carried queries of steps 1.., checkpointed every `stride` steps.
        stride = max(1, math.isqrt(steps - 1))
        checkpoints, carried = {}, q_in[:, :, :, 1:]
        for s in range(1, steps):
            if (s - 1) % stride == 0:
                checkpoints[s] = carried
            if s + 1 < steps:
                carried = _walk_back(carried[:, :, :, 1:], wb[:, :, 1 : n - s], u[:, :, 1 : n - s])
        grad = None  # d carried of the step after the current one
        for first in sorted(checkpoints, reverse=True):
            segment = [checkpoints[first]]
            for s in range(first, min(first + stride, steps) - 1):
                segment.append(
                    _walk_back(segment[-1][:, :, :, 1:], wb[:, :, 1 : n - s], u[:, :, 1 : n - s])
                )
            for s in reversed(range(first, first + len(segment))):
                carried = segment.pop()
                dcarried = step_gradients(s, carried)
                if grad is not None:  # through the walk from step s to step s + 1
                    walked, dw, du_s = _walk_back_adjoint(
                        carried[:, :, :, 1:], wb[:, :, 1 : n - s], u[:, :, 1 : n - s], grad
                    )
                    dcarried[:, :, :, 1:] += walked
                    dwb[:, :, 1 : n - s] += dw
                    du[:, :, 1 : n - s] += du_s
                grad = dcarried
        d_diag, dvalues = sweep.score_gradients(
            0, diag.clone(), vb, dob, lse, row_dot, dbias=dbias, dgate=dgate
        )
        dv += dvalues
        dq_in = torch.zeros_like(q_in)
        if grad is not None:
            dq_in[:, :, :, 1:] = grad
        torch.autograd.backward(blocked, (dwb, du, dq_in, dk_out, d_diag))
        dq, dk, dw, dbeta = (x.grad for x in leaves)
        if dbias is not None:
            dbias = sweep.bias_gradient(dbias, bias)
        if dgate is not None:
            dgate = sweep.gate_gradient(dgate, gate)
        dv = sweep.unblock(dv).to(v.dtype)
        return dq, dk, dv, dw, dbeta, dbias, dgate, None, None, None, None


def path_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    w: Tensor,
    beta: Tensor,
    *,
    scale: float | None = None,
    bias: Tensor | None = None,
    gate: Tensor | None = None,
    window: int | None = None,
    doc_ids: Tensor | None = None,
    block: int = 64,
) -> Tensor:
    """PaTH attention with O(T x block) forward memory; its backward saves O(T x D).

    q [B, T, HQ, D]; k, v, w [B, T, H, D] (w unit-norm); beta [B, T, H] in (0, 2).
    bias, gate, window and doc_ids as in `blockwise_attention`. Returns [B, T, HQ, D].
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _PathAttention.apply(q, k, v, w, beta, bias, gate, doc_ids, scale, window, block)
