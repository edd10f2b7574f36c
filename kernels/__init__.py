"""Fast paths of the attention family, each defined by a reference in `kernels.reference`.

`attention` is the one dispatch point the model calls. On the CPU it runs the blockwise
PyTorch paths (`kernels.blockwise`, `kernels.path`); none materialises a T x T matrix.
"""

from __future__ import annotations

from torch import Tensor

from kernels.angles import accumulate_angles, document_positions, rotate
from kernels.blockwise import blockwise_attention
from kernels.path import path_attention

__all__ = ["accumulate_angles", "attention", "document_positions", "rotate"]


def attention(
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
    doc_ids: Tensor | None = None,
    scale: float | None = None,
    block: int = 64,
) -> Tensor:
    """Causal attention for every position scheme, O(T x block) memory.

    q [B, T, HQ, D]; k, v [B, T, H, D] (HQ a multiple of H).
    angles [B, T, H, D/2]: accumulated angles phi; q and k are rotated by R(phi), and v too
        when rotate_values (the output is then rotated back by R(-phi_i)).
    bias [HQ, >=T]: additive logit bias indexed by distance i - j.
    window: attend only to i - j < window. decay [D/2]: xPos per-pair log-decay per token.
    transport (w [B, T, H, D], beta [B, T, H]): PaTH Householder transport of the keys.
    doc_ids [B, T]: packed documents; no token attends across a boundary.
    """
    if angles is not None:
        q, k = rotate(q, angles), rotate(k, angles)
        if rotate_values:
            v = rotate(v, angles)
    common = dict(scale=scale, bias=bias, window=window, doc_ids=doc_ids, block=block)
    if transport is not None:
        if decay is not None:
            raise ValueError("PaTH transport and xPos decay do not combine")
        o = path_attention(q, k, v, *transport, **common)
    else:
        o = blockwise_attention(q, k, v, decay=decay, **common)
    if angles is not None and rotate_values:
        o = rotate(o, -angles)
    return o
