"""Blockwise causal attention in PyTorch: the CPU path of the attention family.

Queries and keys are cut into blocks of `block` tokens. A diagonal sweep visits, at step s,
every (query block c, key block c - s) pair at once, folding the scores into an online softmax.
The largest tensor is [B, HQ, T, block]: memory is O(T x block), never O(T^2), so evaluation at
64x the trained length fits. Masks: causal, optional sliding window, and document boundaries.

The backward pass is flash-attention's: it saves the output and the log-sum-exp, and sweeps
again, recomputing each step's probabilities, so training memory is O(T x block) as well.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

# Softmax numerators below exp(-60) (1e-26 of the row's largest) are taken as exactly zero: left
# alone, far keys give subnormal floats, which CPUs compute many times slower (and
# torch.set_flush_denormal reaches only the calling thread, not torch's worker threads).
EXP_CUTOFF = -60.0


def exp_or_zero(x: Tensor) -> Tensor:
    """exp(x), exactly 0 where x < EXP_CUTOFF."""
    return torch.exp(torch.where(x >= EXP_CUTOFF, x, float("-inf")))


class DiagonalSweep:
    """Block geometry, bias and masks, and the online-softmax state of one attention call.

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

    def query_blocks(self, q: Tensor, scale: float = 1.0) -> Tensor:
        """Scaled queries (or anything shaped like them) as [B, H, G, nblocks, block, D]."""
        qb = self.blocks(q * scale)
        return qb.view(qb.shape[0], -1, self.groups, *qb.shape[2:])

    def unblock(self, x: Tensor) -> Tensor:
        """[B, Hx(, G), nblocks, block, D] -> [B, T, Hx(*G), D], padding dropped."""
        *lead, n, blk, D = x.shape
        x = x.reshape(lead[0], -1, n * blk, D).transpose(1, 2)
        return x[:, : self.length]

    def steps(self) -> range:
        """Offsets s = c_query - c_key worth visiting (all, or those the window reaches)."""
        if self.window is None:
            return range(self.n)
        # The closest pair of blocks s apart is (s - 1) * block + 1 tokens apart.
        return range(min(self.n, (self.window - 2) // self.block + 2))

    def distances(self, s: int) -> Tensor:
        """i - j for query blocks s.. against key blocks ..n-s-1: [n - s, block, block]."""
        return self.pos[s:, :, None] - self.pos[: self.n - s, None, :]

    def logits(self, s: int, scores: Tensor) -> Tensor:
        """Add the distance bias to step s's scores [B, H, G, n - s, bq, bk] and mask them."""
        dist = self.distances(s)
        if self.bias is not None:
            scores = scores + self.bias[:, :, dist.clamp(0, self.bias.shape[-1] - 1)]
        keep = dist >= 0
        if self.window is not None:
            keep = keep & (dist < self.window)
        if self.doc is not None:
            keep = keep & (self.doc[..., s:, :, None] == self.doc[..., : self.n - s, None, :])
        return scores.masked_fill(~keep, torch.finfo(scores.dtype).min)

    def fold(self, s: int, scores: Tensor, values: Tensor) -> None:
        """Fold step s's raw scores in; values [B, H, n - s, bk, D] are the key blocks'."""
        scores = self.logits(s, scores)
        old_max = self.max[..., s:, :]
        new_max = torch.maximum(old_max, scores.amax(dim=-1))
        rescale = exp_or_zero(old_max - new_max)
        probs = exp_or_zero(scores - new_max[..., None])
        new_sum = self.sum[..., s:, :] * rescale + probs.sum(dim=-1)
        new_acc = self.acc[..., s:, :, :] * rescale[..., None] + torch.einsum(
            "bhgcij,bhcjd->bhgcid", probs, values
        )
        # Out of place: autograd (PaTH's path) still needs the old state.
        self.max = torch.cat((self.max[..., :s, :], new_max), dim=-2)
        self.sum = torch.cat((self.sum[..., :s, :], new_sum), dim=-2)
        self.acc = torch.cat((self.acc[..., :s, :, :], new_acc), dim=-3)

    def output(self) -> Tensor:
        """The normalised output in blocks, [B, H, G, nblocks, block, D]."""
        return self.acc / self.sum[..., None]

    def log_sum_exp(self) -> Tensor:
        return self.max + torch.log(self.sum)


def _decay_factors(decay: Tensor, block: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """xPos: exp(decay * (i - j)) = exp(decay * (s*block + i_local)) * exp(-decay * j_local).

    Returns (query factor without the s*block part, key factor), each [block, D]; both stay
    within exp(|decay| * block) whatever the distance."""
    local = torch.arange(block, device=decay.device, dtype=dtype)[:, None]
    pair_decay = torch.cat((decay, decay)).to(dtype)
    return torch.exp(pair_decay * local), torch.exp(-pair_decay * local)


def _query_decay(q_factor: Tensor, decay: Tensor, s: int, block: int) -> Tensor:
    return q_factor * torch.exp(torch.cat((decay, decay)).to(q_factor.dtype) * (s * block))


def step_scores(
    sweep: DiagonalSweep, q: Tensor, k: Tensor, decay: Tensor | None, scale: float
) -> Iterator[tuple[int, Tensor]]:
    """(s, raw scores [B, H, G, n - s, block, block]) for every step of the sweep, xPos decay
    included (bias and masks are `sweep.logits`'s)."""
    qb, kb = sweep.query_blocks(q, scale), sweep.blocks(k)
    if decay is not None:
        q_factor, k_factor = _decay_factors(decay, sweep.block, sweep.dtype)
        kb = kb * k_factor
    for s in sweep.steps():
        qs = qb[:, :, :, s:]
        if decay is not None:
            qs = qs * _query_decay(q_factor, decay, s, sweep.block)
        yield s, torch.einsum("bhgcid,bhcjd->bhgcij", qs, kb[:, :, : sweep.n - s])


class _BlockwiseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, decay, doc_ids, scale, window, block):
        sweep = DiagonalSweep(q, k, block=block, doc_ids=doc_ids, bias=bias, window=window)
        vb = sweep.blocks(v)
        for s, scores in step_scores(sweep, q, k, decay, scale):
            sweep.fold(s, scores, vb[:, :, : sweep.n - s])
        out = sweep.unblock(sweep.output()).to(q.dtype)
        ctx.save_for_backward(q, k, v, bias, decay, doc_ids, out, sweep.log_sum_exp())
        ctx.scale, ctx.window, ctx.block = scale, window, block
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, bias, decay, doc_ids, out, lse = ctx.saved_tensors
        scale, block = ctx.scale, ctx.block
        sweep = DiagonalSweep(q, k, block=block, doc_ids=doc_ids, bias=bias, window=ctx.window)
        qb, kb, vb = sweep.query_blocks(q, scale), sweep.blocks(k), sweep.blocks(v)
        dob, ob = sweep.query_blocks(dout), sweep.query_blocks(out)
        row_dot = (dob * ob).sum(-1)  # rowsum(dO * O)
        k_factor = 1.0
        if decay is not None:
            q_factor, k_factor = _decay_factors(decay, block, sweep.dtype)
            kb = kb * k_factor
        dq, dk, dv = torch.zeros_like(qb), torch.zeros_like(kb), torch.zeros_like(vb)
        dbias = None if bias is None else torch.zeros_like(sweep.bias)
        n = sweep.n
        for s in sweep.steps():
            qs, q_step = qb[:, :, :, s:], 1.0
            if decay is not None:
                q_step = _query_decay(q_factor, decay, s, block)
                qs = qs * q_step
            ks, vs = kb[:, :, : n - s], vb[:, :, : n - s]
            scores = sweep.logits(s, torch.einsum("bhgcid,bhcjd->bhgcij", qs, ks))
            probs = exp_or_zero(scores - lse[..., s:, :, None])
            dv[:, :, : n - s] += torch.einsum("bhgcij,bhgcid->bhcjd", probs, dob[:, :, :, s:])
            dprobs = torch.einsum("bhgcid,bhcjd->bhgcij", dob[:, :, :, s:], vs)
            dscores = probs * (dprobs - row_dot[..., s:, :, None])
            dq[:, :, :, s:] += torch.einsum("bhgcij,bhcjd->bhgcid", dscores, ks) * q_step
            dk[:, :, : n - s] += torch.einsum("bhgcij,bhgcid->bhcjd", dscores, qs)
            if dbias is not None:
                index = sweep.distances(s).clamp(0, dbias.shape[-1] - 1).flatten()
                dbias.index_add_(-1, index, dscores.sum(0).flatten(2))
        dq = sweep.unblock(dq * scale).to(q.dtype)
        dk = sweep.unblock(dk * k_factor).to(k.dtype)
        dv = sweep.unblock(dv).to(v.dtype)
        if dbias is not None:
            dbias = dbias.view_as(bias).to(bias.dtype)
        return dq, dk, dv, dbias, None, None, None, None, None


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
    """Causal softmax attention with O(T x block) memory, forward and backward.

    q [B, T, HQ, D]; k, v [B, T, H, D] with HQ a multiple of H (grouped-query heads).
    bias [HQ, >=T]: added to the logit of distance i - j (a table indexed by distance).
    window: keep only i - j < window. decay [D/2]: per-pair log-decay (xPos): the pair p
    contribution to the logit of distance n is multiplied by exp(decay[p] * n); not learned.
    doc_ids [B, T]: no attention across documents. Returns [B, T, HQ, D] in q's dtype.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _BlockwiseAttention.apply(q, k, v, bias, decay, doc_ids, scale, window, block)
