"""PaTH attention on CUDA through fla's Triton kernels (`fla.ops.path_attn`, fla-core >= 0.6.0).

fla's `parallel_path_attn(q, k, v, w, beta, g, scale, cu_seqlens)` computes

    o_i = sum_j softmax_j(scale * (q_i^T H_i H_{i-1} ... H_{j+1} k_j + G_i - G_j)) v_j,

H_t = I - beta_t w_t w_t^T, G the cumulative sum of the per-token log gates g [B, T, HQ]
(restarted at every sequence of cu_seqlens). The transport is `kernels.path`'s exactly: the same
H_t from w and beta as given (no normalisation inside: the model's w is unit-norm, its beta in
(0, 2)), the same product over j < t <= i, w and beta per key/value head, q grouped over them.
What differs is the input layout, which `fla_arguments` translates:

- the gate is inside the scale: ALiBi's bias -m_h (i - j) is the constant g = -m_h / scale,
  and a cumulative forget gate F (FoX) is g_t = (F_t - F_{t-1}) / scale (float64 differences);
- documents are fla's varlen rows: doc_ids [B, T] become one packed row of B x T tokens cut at
  every document and row start (cu_seqlens, a host synchronisation: its length is the
  document count);
- w, beta and g are float32 (fla asserts it).

fla's kernels take q, k, v in bfloat16/float16 (they run their dots in half precision, w cast
to float16) and head dims FLA_HEAD_DIMS (its asserts). Its G is float32, so a gate's logit
F_i - F_j carries an absolute error up to about 2 |F_T| 2^-24 over a document of T tokens
(ALiBi: 2 m_h T 2^-24, 0.013 for m = 0.84 over 131072 tokens), below bfloat16's own rounding
of q.k at that length.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import Tensor

FLA_HEAD_DIMS = (16, 32, 64, 128)  # fla-core 0.6.0's parallel_path_attn asserts these
FLA_DTYPES = (torch.bfloat16, torch.float16)


def fla_installed() -> bool:
    """Whether fla (the `gpu` extra's fla-core) can be imported."""
    return importlib.util.find_spec("fla") is not None


def _kernel():
    """fla's PaTH attention (imported on first use: it imports Triton)."""
    from fla.ops.path_attn import parallel_path_attn

    return parallel_path_attn


def packed_cu_seqlens(doc_ids: Tensor) -> Tensor:
    """int64 cumulative lengths [N + 1] of the documents of doc_ids [B, T] (contiguous runs)
    laid end to end in one row of B x T tokens: a cut at every document and row start."""
    B, T = doc_ids.shape
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    cuts = starts.flatten().nonzero().flatten()
    return torch.cat((cuts, cuts.new_tensor([B * T])))


def fla_arguments(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    w: Tensor,
    beta: Tensor,
    *,
    scale: float,
    slopes: Tensor | None = None,
    gate: Tensor | None = None,
    doc_ids: Tensor | None = None,
) -> dict:
    """The keyword arguments of fla's `parallel_path_attn` for `kernels.path.path_attention`'s
    inputs: q [B, T, HQ, D], k, v, w [B, T, H, D], beta [B, T, H]; ALiBi's slopes [HQ] (its
    bias -m_h (i - j)); gate [B, T, HQ] the cumulative log forget gates F; doc_ids [B, T].
    With doc_ids every tensor is packed into one row of B x T tokens."""
    B, T, HQ, _ = q.shape
    g = None
    if slopes is not None:
        g = (-slopes.detach().double() / scale).to(q.device).expand(B, T, HQ)
    if gate is not None:
        steps = torch.diff(gate.double(), dim=1, prepend=gate[:, :1].double()) / scale
        g = steps if g is None else g + steps
    args = dict(q=q, k=k, v=v, w=w.float(), beta=beta.float(), g=g, scale=scale, cu_seqlens=None)
    if g is not None:
        args["g"] = g.float()
    if doc_ids is not None:
        for name in ("q", "k", "v", "w", "beta", "g"):
            if args[name] is not None:
                args[name] = args[name].reshape(1, B * T, *args[name].shape[2:])
        args["cu_seqlens"] = packed_cu_seqlens(doc_ids)
    return args


def fla_path_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    w: Tensor,
    beta: Tensor,
    *,
    scale: float,
    slopes: Tensor | None = None,
    gate: Tensor | None = None,
    doc_ids: Tensor | None = None,
) -> Tensor:
    """`kernels.path.path_attention` (with ALiBi's slopes for its bias) on fla's kernels;
    differentiable (fla's backward). Returns [B, T, HQ, D] in q's dtype."""
    args = fla_arguments(q, k, v, w, beta, scale=scale, slopes=slopes, gate=gate, doc_ids=doc_ids)
    out, _ = _kernel()(**args)
    return out.reshape(q.shape).to(q.dtype)
