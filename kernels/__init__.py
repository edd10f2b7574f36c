"""Fast paths of the attention family, each defined by a reference in `kernels.reference`.

`attention` and `accumulate_angles` are the dispatch points the model calls. On CUDA they run
the Triton kernels of `kernels.hybrid` (imported on first use) for the schemes those serve:
rotations with or without the values, ALiBi or no bias, a sliding window, packed documents;
and PaTH transport (with ALiBi, a forget gate or neither, no window) on fla's kernels
(`kernels.path_fla`) for the head dims and dtypes fla has. Everywhere else (the CPU; xPos
decay, forget gates and non-ALiBi bias tables on CUDA too) they run the blockwise PyTorch paths
(`kernels.blockwise`, `kernels.path`, `kernels.angles`). Both the fused kernel and the blockwise
path skip, for ALiBi heads (and the blockwise path for forget gates), the key blocks beyond the
reach `kernels.alibi_reach` proves negligible (skip_eps). No forward pass materialises a T x T
matrix, and no backward saves one: each recomputes its steps (`kernels.path` for PaTH's).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils._pytree import tree_map

from kernels import angles as _angles
from kernels.alibi_reach import alibi_reach, gate_reach
from kernels.angles import document_positions, rotate
from kernels.blockwise import blockwise_attention
from kernels.path import path_attention
from kernels.path_fla import FLA_DTYPES, FLA_HEAD_DIMS, fla_installed, fla_path_attention
from kernels.reference import check_mechanisms

__all__ = [
    "AlibiTable",
    "accumulate_angles",
    "attention",
    "document_positions",
    "hybrid_attention",
    "rotate",
]

FUSED_DEVICES = ("cuda",)  # device types on which the Triton kernels serve the model
FLA_DEVICES = ("cuda",)  # device types on which fla's kernels serve PaTH


def __getattr__(name: str):
    """`kernels.hybrid_attention`, imported on first use (it imports Triton)."""
    if name == "hybrid_attention":
        from kernels.hybrid import hybrid_attention

        return hybrid_attention
    raise AttributeError(f"module 'kernels' has no attribute {name!r}")


class AlibiTable(Tensor):
    """ALiBi's bias table b[h, n] = -m_h n, [HQ, T], that remembers its slopes m [HQ].

    It is an ordinary table everywhere (any op on it returns a plain Tensor), but one made by
    `of_slopes` is built only when an op reads it: the fused CUDA kernel and fla read `slopes`
    instead and compute the bias on the fly, so on their paths no [HQ, T] table exists.
    Its shape, dtype, device and grad flags are known without building it.
    """

    slopes: Tensor
    _table: Tensor | None

    @staticmethod
    def wrap(table: Tensor, slopes: Tensor) -> AlibiTable:
        """`table` (which must equal -slopes[:, None] * n) tagged with its slopes."""
        tagged = table.as_subclass(AlibiTable)
        tagged.slopes, tagged._table = slopes, table
        return tagged

    @staticmethod
    def of_slopes(slopes: Tensor, length: int) -> AlibiTable:
        """The table -slopes[:, None] * n over distances n < length, in slopes' dtype, built on
        first read (until then it holds one number)."""
        empty = torch.zeros((), dtype=slopes.dtype, device=slopes.device)
        tagged = empty.expand(slopes.numel(), length).as_subclass(AlibiTable)
        tagged.slopes, tagged._table = slopes, None
        return tagged

    def table(self) -> Tensor:
        """The table as a plain Tensor (built, once, on the first call)."""
        if self._table is None:
            with torch._C.DisableTorchFunctionSubclass():
                n = torch.arange(self.shape[-1], dtype=self.dtype, device=self.device)
                self._table = -self.slopes[:, None] * n
        return self._table

    def as_subclass(self, cls: type) -> Tensor:
        return self.table().as_subclass(cls)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func not in _TABLE_FREE:
            args, kwargs = tree_map(
                lambda x: x.table() if isinstance(x, AlibiTable) else x, (args, kwargs or {})
            )
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))


# What an `AlibiTable` answers without building its table.
_TABLE_FREE = {
    *(getattr(Tensor, name).__get__ for name in ("shape", "dtype", "device", "ndim", "is_cuda")),
    *(getattr(Tensor, name).__get__ for name in ("requires_grad", "grad_fn", "is_leaf")),
    Tensor.dim,
    Tensor.size,
}


def accumulate_angles(delta: Tensor, doc_ids: Tensor | None = None) -> Tensor:
    """phi_t = sum of delta_s over s <= t in t's document, kept precise (docs/design.md).

    delta [B, T, H, P]. On CUDA: the Triton chunkwise scan, float32 (at least) in [0, 2*pi).
    Elsewhere: `kernels.angles.accumulate_angles`, in delta's dtype. Both are differentiable
    and congruent mod 2*pi to the exact prefix sum.
    """
    if delta.device.type in FUSED_DEVICES:
        from kernels.hybrid import document_bounds, scan_angles

        return scan_angles(delta, *((None, None) if doc_ids is None else document_bounds(doc_ids)))
    return _angles.accumulate_angles(delta, doc_ids)


def fused_serves(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    bias: Tensor | None = None,
    decay: Tensor | None = None,
    transport: tuple[Tensor, Tensor] | None = None,
    gate: Tensor | None = None,
) -> bool:
    """Whether `attention` runs this call on the fused Triton kernel: a device in
    FUSED_DEVICES, no xPos decay, PaTH transport or forget gate, no bias or a constant
    `AlibiTable`, and a head dim and dtype the kernel has (`kernels.hybrid.attention.HEAD_DIMS`,
    `DTYPES`)."""
    if q.device.type not in FUSED_DEVICES or any(x is not None for x in (decay, transport, gate)):
        return False
    if bias is not None and not (isinstance(bias, AlibiTable) and not bias.requires_grad):
        return False
    from kernels.hybrid.attention import DTYPES, HEAD_DIMS

    return q.shape[-1] in HEAD_DIMS and q.dtype in DTYPES and k.dtype == v.dtype == q.dtype


def fla_serves(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    bias: Tensor | None,
    window: int | None,
    deterministic: bool = False,
) -> bool:
    """Whether `attention` runs this PaTH call on fla's kernels (`kernels.path_fla`): fla
    installed, a device in FLA_DEVICES, no window, no bias or a constant `AlibiTable`, a head
    dim and dtype fla has (FLA_HEAD_DIMS, FLA_DTYPES), and not `deterministic` (fla's backward
    adds its gradients with atomics)."""
    if q.device.type not in FLA_DEVICES or window is not None or deterministic:
        return False
    if bias is not None and not (isinstance(bias, AlibiTable) and not bias.requires_grad):
        return False
    supported = q.shape[-1] in FLA_HEAD_DIMS and q.dtype in FLA_DTYPES
    return supported and k.dtype == v.dtype == q.dtype and fla_installed()


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
    gate: Tensor | None = None,
    doc_ids: Tensor | None = None,
    scale: float | None = None,
    skip_eps: float = 0.0,
    block: int = 64,
    deterministic: bool = False,
) -> Tensor:
    """Causal attention for every position scheme, O(T x block) memory.

    q [B, T, HQ, D]; k, v [B, T, H, D] (HQ a multiple of H).
    angles [B, T, H, D/2]: accumulated angles phi; q and k are rotated by R(phi), and v too
        when rotate_values (the output is then rotated back by R(-phi_i)).
    bias [HQ, >=T]: additive logit bias indexed by distance i - j.
    window: attend only to i - j < window. decay [D/2]: xPos per-pair log-decay per token.
    transport (w [B, T, H, D], beta [B, T, H]): PaTH Householder transport of the keys.
    gate [B, T, HQ]: cumulative log forget gates F (FoX): F_i - F_j is added to logit_ij.
    doc_ids [B, T]: packed documents; no token attends across a boundary.
    skip_eps: with an `AlibiTable` bias or a forget gate (no decay, no PaTH transport), skip
        the key blocks that move the output by at most skip_eps x max|v|
        (`kernels.alibi_reach`); 0: none.
    block: the blockwise path's tile (the fused kernel picks its own).
    deterministic: the fused kernel with pinned tiles and no atomics (bitwise-reproducible
        gradients on a GPU; `kernels.hybrid.attention.fused_attention`), and PaTH on the
        blockwise path rather than fla's; the blockwise paths are deterministic anyway.
    """
    check_mechanisms(angles, decay, transport)
    if fused_serves(q, k, v, bias=bias, decay=decay, transport=transport, gate=gate):
        from kernels.hybrid import document_bounds, fused_attention

        starts, ends = (None, None) if doc_ids is None else document_bounds(doc_ids)
        slopes = None if bias is None else bias.slopes
        return fused_attention(
            q, k, v, angles, slopes, rotate_values=rotate_values, window=window,
            starts=starts, ends=ends, scale=scale, skip_eps=skip_eps, deterministic=deterministic,
        )  # fmt: skip
    if angles is not None:
        q, k = rotate(q, angles), rotate(k, angles)
        if rotate_values:
            v = rotate(v, angles)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    common = dict(scale=scale, bias=bias, gate=gate, window=window, doc_ids=doc_ids, block=block)
    if transport is not None and fla_serves(
        q, k, v, bias=bias, window=window, deterministic=deterministic
    ):
        slopes = None if bias is None else bias.slopes
        o = fla_path_attention(
            q, k, v, *transport, scale=scale, slopes=slopes, gate=gate, doc_ids=doc_ids
        )
    elif transport is not None:
        o = path_attention(q, k, v, *transport, **common)
    else:
        reach = None
        if skip_eps > 0 and decay is None:
            if gate is not None and bias is None:
                reach = gate_reach(q, k, gate, scale, skip_eps)
            elif gate is None and isinstance(bias, AlibiTable):
                reach = alibi_reach(q, k, bias.slopes, scale, skip_eps)
        o = blockwise_attention(q, k, v, decay=decay, reach=reach, **common)
    if angles is not None and rotate_values:
        o = rotate(o, -angles)
    return o
