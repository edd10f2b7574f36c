"""Blockwise causal attention in PyTorch: the CPU path of the attention family.

Queries and keys are cut into blocks of `block` tokens. A diagonal sweep visits, at step s,
every (query block c, key block c - s) pair at once, folding the scores into an online softmax.
The largest tensor is [B, HQ, T, block]: memory is O(T x block), never O(T^2), so evaluation at
64x the trained length fits. Masks: causal, optional sliding window, and document boundaries.
"""

from __future__ import annotations

import torch
from torch import Tensor


class DiagonalSweep:
    """Block geometry, masking and the online-softmax state shared by the blockwise paths.

    Heads are laid out [B, H, G, ...]: H key/value heads, G query heads per key head.
    """

    def __init__(
        self,
        q: Tensor,
        k: Tensor,
        *,
        block: int,
        doc_ids: Tensor | None,
        bias: Tensor | None,
        window: int | None,
    ):
        B, T, HQ, D = q.shape
        H = k.shape[2]
        self.block, self.length, self.window = block, T, window
        self.groups, self.n = HQ // H, -(-T // block)
        self.dtype = dtype = torch.promote_types(q.dtype, torch.float32)  # scores in >= fp32
        self.bias = None if bias is None else bias.to(dtype).view(H, self.groups, -1)
        self.pos = torch.arange(self.n * block, device=q.device).view(self.n, block)
        self.doc = None
        if doc_ids is not None:
            # Padding tokens get document -1: no real query sees them.
            padded = torch.nn.functional.pad(doc_ids, (0, self.n * block - T), value=-1)
            self.doc = padded.view(B, 1, 1, self.n, block)
        shape = (B, H, self.groups, self.n, block)
        self.max = torch.full(shape, torch.finfo(dtype).min, dtype=dtype, device=q.device)
        self.sum = torch.zeros(shape, dtype=dtype, device=q.device)
        self.acc = torch.zeros((*shape, D), dtype=dtype, device=q.device)

    def blocks(self, x: Tensor) -> Tensor:
        """[B, T, Hx, D] -> [B, Hx, nblocks, block, D] in the score dtype, zero-padded."""
        B, T, Hx, D = x.shape
        x = torch.nn.functional.pad(x.to(self.dtype), (0, 0, 0, 0, 0, self.n * self.block - T))
        return x.view(B, self.n, self.block, Hx, D).permute(0, 3, 1, 2, 4)

    def query_blocks(self, q: Tensor, scale: float) -> Tensor:
        """Scaled queries as [B, H, G, nblocks, block, D]."""
        qb = self.blocks(q * scale)
        return qb.view(qb.shape[0], -1, self.groups, *qb.shape[2:])

    def steps(self) -> range:
        """Offsets s = c_query - c_key worth visiting (all, or those the window reaches)."""
        if self.window is None:
            return range(self.n)
        # The closest pair of blocks s apart is (s - 1) * block + 1 tokens apart.
        return range(min(self.n, (self.window - 2) // self.block + 2))

    def fold(self, s: int, scores: Tensor, values: Tensor) -> None:
        """Fold scores [B, H, G, n - s, bq, bk] of query blocks s.. vs key blocks ..n-s-1 in.

        values: [B, H, n - s, bk, D], the key blocks' values.
        """
        dist = self.pos[s:, :, None] - self.pos[: self.n - s, None, :]  # [n - s, bq, bk]
        if self.bias is not None:
            scores = scores + self.bias[:, :, dist.clamp(0, self.bias.shape[-1] - 1)]
        keep = dist >= 0
        if self.window is not None:
            keep = keep & (dist < self.window)
        if self.doc is not None:
            keep = keep & (self.doc[..., s:, :, None] == self.doc[..., : self.n - s, None, :])
        scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)

        old_max = self.max[..., s:, :]
        new_max = torch.maximum(old_max, scores.amax(dim=-1))
        rescale = torch.exp(old_max - new_max)
        probs = torch.exp(scores - new_max[..., None])
        new_sum = self.sum[..., s:, :] * rescale + probs.sum(dim=-1)
        new_acc = self.acc[..., s:, :, :] * rescale[..., None] + torch.einsum(
            "bhgcij,bhcjd->bhgcid", probs, values
        )
        # Out of place (the old state is still needed by autograd).
        self.max = torch.cat((self.max[..., :s, :], new_max), dim=-2)
        self.sum = torch.cat((self.sum[..., :s, :], new_sum), dim=-2)
        self.acc = torch.cat((self.acc[..., :s, :, :], new_acc), dim=-3)

    def output(self) -> Tensor:
        """The normalised output, [B, T, HQ, D]."""
        o = self.acc / self.sum[..., None]
        B, H, G, n, blk, D = o.shape
        return o.permute(0, 3, 4, 1, 2, 5).reshape(B, n * blk, H * G, D)[:, : self.length]


def blockwise_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float | None = None,
    bias: Tensor | None = None,
    window: int | None = None,
    decay: Tensor | None = None,
    doc_ids: Tensor | None = None,
    block: int = 64,
) -> Tensor:
    """Causal softmax attention with O(T x block) memory.

    q [B, T, HQ, D]; k, v [B, T, H, D] with HQ a multiple of H (grouped-query heads).
    bias [HQ, >=T]: added to the logit of distance i - j (a table indexed by distance).
    window: keep only i - j < window. decay [D/2]: per-pair log-decay (xPos): the pair p
    contribution to the logit of distance n is multiplied by exp(decay[p] * n).
    doc_ids [B, T]: no attention across documents. Returns [B, T, HQ, D] in q's dtype.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    sweep = DiagonalSweep(q, k, block=block, doc_ids=doc_ids, bias=bias, window=window)
    qb = sweep.query_blocks(q, scale)
    kb, vb = sweep.blocks(k), sweep.blocks(v)
    if decay is not None:
        # Factor exp(decay * (i - j)) = exp(decay * (s*block + i_local)) * exp(-decay * j_local):
        # both factors stay bounded by exp(|decay| * block) whatever the distance.
        local = torch.arange(block, device=q.device, dtype=sweep.dtype)[:, None]
        pair_decay = torch.cat((decay, decay)).to(sweep.dtype)
        kb = kb * torch.exp(-pair_decay * local)
    for s in sweep.steps():
        qs = qb[:, :, :, s:]
        if decay is not None:
            qs = qs * torch.exp(pair_decay * (local + s * block))
        scores = torch.einsum("bhgcid,bhcjd->bhgcij", qs, kb[:, :, : sweep.n - s])
        sweep.fold(s, scores, vb[:, :, : sweep.n - s])
    return sweep.output().to(q.dtype)
