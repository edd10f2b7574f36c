"""Blockwise causal attention in PyTorch: the CPU path of the attention family.

Queries and keys are cut into blocks of `block` tokens. A diagonal sweep visits, at step s,
every (query block c, key block c - s) pair at once, folding the scores into an online softmax.
The largest tensor is [B, HQ, T, block]: memory is O(T x block), never O(T^2), so evaluation at
64x the trained length fits. Masks: causal, optional sliding window, and document boundaries.

The backward pass is flash-attention's: it saves the output and the log-sum-exp, and sweeps
again, recomputing each step's probabilities, so training memory is O(T x block) as well.
"""

from __future__ import annotations

import bisect
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

    Heads are laid out [B, H, G, ...]: H key/value heads, G query heads per key head. With a
    `reach` (`kernels.alibi_reach`), each key/value head stops at the last step that holds a
    key within its query heads' reach; heads are sorted by that step, so step s works on the
    heads `first_head(s)`.. only (a slice, not a gather).

    Knowing the steps takes the reach to the host: one synchronisation with the device,
    which the skipped steps repay many times over. The backward passes take the forward's
    `head_steps_by_head` instead of synchronising again.

    The state is updated in place: the backward passes recompute what they need.
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
        reach: Tensor | None = None,
        gate: Tensor | None = None,
        head_steps: list[int] | None = None,
    ):
        B, T, HQ, D = q.shape
        H = k.shape[2]
        self.block, self.length, self.window = block, T, window
        G, n = HQ // H, -(-T // block)
        self.groups, self.n = G, n
        self.dtype = dtype = torch.promote_types(q.dtype, torch.float32)  # scores in >= fp32
        steps = self._steps_needed(H, window, reach) if head_steps is None else head_steps
        self.head_steps_by_head = steps  # per key/value head, in their order
        order = sorted(range(H), key=steps.__getitem__)
        self.head_steps = [steps[h] for h in order]
        self.order = None
        if order != list(range(H)):
            self.order = torch.tensor(order, device=q.device)
        self.bias = None if bias is None else self.reorder_heads(bias.to(dtype).view(H, G, -1), 0)
        self.gate_anchor = self.gate_local = None
        if gate is not None:
            self._split_gate(gate)
        local = torch.arange(block, device=q.device)
        self.local = local[:, None] - local[None, :]  # i - j inside a pair of blocks
        self.doc = None
        if doc_ids is not None:
            # Padding tokens get document -1: no real query sees them.
            padded = torch.nn.functional.pad(doc_ids, (0, n * block - T), value=-1)
            self.doc = padded.view(B, 1, 1, n, block)
        shape = (B, H, G, n, block)
        self.max = torch.full(shape, torch.finfo(dtype).min, dtype=dtype, device=q.device)
        self.sum = torch.zeros(shape, dtype=dtype, device=q.device)
        self.acc = torch.zeros((*shape, D), dtype=dtype, device=q.device)

    def _split_gate(self, gate: Tensor) -> None:
        """Cumulative log forget gates F [B, T, HQ] as per-block anchors A_c = F at the block's
        first token (float64) and offsets F - A_c within blocks (score dtype): F_i - F_j is
        then (A_c - A_c') + (F_i - A_c) - (F_j - A_c'), each term small or exact, so the far
        pairs of a long sequence lose no precision to F's magnitude."""
        B, T, _ = gate.shape
        gate = self.reorder_heads(gate.double(), 2)
        tail = gate[:, -1:].expand(B, self.n * self.block - T, -1)  # padding: finite, unseen
        blocks = torch.cat((gate, tail), dim=1).view(B, self.n, self.block, -1)
        blocks = blocks.permute(0, 3, 1, 2).reshape(B, -1, self.groups, self.n, self.block)
        self.gate_anchor = blocks[..., 0]  # [B, H, G, n]
        self.gate_local = (blocks - self.gate_anchor[..., None]).to(self.dtype)

    def gate_gradient(self, dgate: Tensor, gate: Tensor) -> Tensor:
        """d F [B, T, HQ], in `gate`'s dtype and head order, from `score_gradients`' blocks."""
        B, H, G, n, block = dgate.shape
        flat = dgate.reshape(B, H * G, n * block).transpose(1, 2)[:, : self.length]
        return self.reorder_heads(flat, 2, back=True).to(gate.dtype)

    def _steps_needed(self, H: int, window: int | None, reach: Tensor | None) -> list[int]:
        """Per key/value head: how many steps hold a key at distance < min(window, reach).
        Step s >= 1 starts at distance (s - 1) * block + 1."""
        limit = torch.full((H,), self.length if window is None else window, dtype=torch.int64)
        if reach is not None:
            per_head = reach.amax(dim=0).view(H, self.groups).amax(dim=1).cpu()
            limit = torch.minimum(limit, per_head)
        steps = (limit - 1 + self.block - 1) // self.block + 1  # ceil((limit - 1) / block) + 1
        return steps.clamp(1, self.n).tolist()

    def reorder_heads(self, x: Tensor, dim: int, *, back: bool = False) -> Tensor:
        """x with its key/value heads (or H x G query heads) along `dim` put in sweep order, or
        `back` in their original order."""
        if self.order is None:
            return x
        order = self.order
        if back:
            order = torch.empty_like(order)
            order[self.order] = torch.arange(order.numel(), device=order.device)
        if x.shape[dim] != order.numel():  # query heads: each key/value head's G in a row
            groups = torch.arange(self.groups, device=order.device)
            order = (order[:, None] * self.groups + groups).flatten()
        return x.index_select(dim, order)

    def blocks(self, x: Tensor) -> Tensor:
        """[B, T, Hx, D] -> [B, Hx, nblocks, block, D] in the score dtype, zero-padded."""
        B, T, Hx, D = x.shape
        x = self.reorder_heads(x.to(self.dtype), 2)
        x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, self.n * self.block - T))
        return x.view(B, self.n, self.block, Hx, D).permute(0, 3, 1, 2, 4)

    def query_blocks(self, q: Tensor, scale: float = 1.0) -> Tensor:
        """Scaled queries (or anything shaped like them) as [B, H, G, nblocks, block, D]."""
        qb = self.blocks(q * scale)
        return qb.view(qb.shape[0], -1, self.groups, *qb.shape[2:])

    def unblock(self, x: Tensor) -> Tensor:
        """[B, Hx(, G), nblocks, block, D] -> [B, T, Hx(*G), D], padding dropped, heads in
        their original order."""
        *lead, n, blk, D = x.shape
        x = x.reshape(lead[0], -1, n * blk, D).transpose(1, 2)[:, : self.length]
        return self.reorder_heads(x, 2, back=True)

    def steps(self) -> range:
        """Offsets s = c_query - c_key worth visiting for at least one head."""
        return range(self.head_steps[-1])

    def first_head(self, s: int) -> int:
        """The first head (in sweep order) that step s visits."""
        return bisect.bisect_right(self.head_steps, s)

    def logits(self, s: int, scores: Tensor, h0: int = 0) -> Tensor:
        """Add the distance bias to step s's scores [B, H - h0, G, n - s, bq, bk] and mask
        them, in place. The distance i - j = s * block + (i - j)_local is the same for every
        pair of blocks of the step, so bias and masks are [block, block] tables."""
        dist = s * self.block + self.local
        if self.bias is not None:
            table = self.bias[h0:, :, dist.clamp(0, self.bias.shape[-1] - 1)]
            scores.add_(table[:, :, None])
        if self.gate_local is not None:  # F_i - F_j
            anchors, local = self.gate_anchor[:, h0:], self.gate_local[:, h0:]
            across = (anchors[..., s:] - anchors[..., : self.n - s]).to(scores.dtype)
            scores.add_(across[..., None, None] + local[..., s:, :, None])
            scores.sub_(local[..., : self.n - s, None, :])
        keep = None
        if s == 0:
            keep = dist >= 0
        if self.window is not None and s * self.block + self.block - 1 >= self.window:
            keep = dist < self.window if keep is None else keep & (dist < self.window)
        if self.doc is not None:
            same = self.doc[..., s:, :, None] == self.doc[..., : self.n - s, None, :]
            keep = same if keep is None else keep & same
        if keep is not None:
            scores.masked_fill_(~keep, torch.finfo(scores.dtype).min)
        return scores

    def numerators(self, logits: Tensor, row_max: Tensor) -> Tensor:
        """exp_or_zero(logits - row_max[..., None]), in place."""
        logits.sub_(row_max[..., None])
        return torch.nn.functional.threshold_(logits, EXP_CUTOFF, float("-inf")).exp_()

    def fold(self, s: int, scores: Tensor, values: Tensor, h0: int = 0) -> None:
        """Fold step s's raw scores in for heads h0..; values [B, H - h0, n - s, bk, D] are the
        key blocks'."""
        scores = self.logits(s, scores, h0)
        old_max = self.max[:, h0:, :, s:]
        new_max = torch.maximum(old_max, scores.amax(dim=-1))
        rescale = exp_or_zero(old_max - new_max)
        probs = self.numerators(scores, new_max)
        new_sum = self.sum[:, h0:, :, s:] * rescale + probs.sum(dim=-1)
        pv = torch.einsum("bhgcij,bhcjd->bhgcid", probs, values)
        old_max.copy_(new_max)
        self.sum[:, h0:, :, s:] = new_sum
        self.acc[:, h0:, :, s:].mul_(rescale[..., None]).add_(pv)

    def output(self) -> Tensor:
        """The normalised output in blocks, [B, H, G, nblocks, block, D]."""
        return self.acc / self.sum[..., None]

    def log_sum_exp(self) -> Tensor:
        return self.max + torch.log(self.sum)

    def output_gradient(self, dout: Tensor, out: Tensor) -> tuple[Tensor, Tensor]:
        """dO in query blocks, and the backward's per-row constant rowsum(dO * O)."""
        dob = self.query_blocks(dout)
        return dob, (dob * self.query_blocks(out)).sum(-1)

    def score_gradients(
        self,
        s: int,
        scores: Tensor,
        values: Tensor,
        dout: Tensor,
        lse: Tensor,
        row_dot: Tensor,
        h0: int = 0,
        dbias: Tensor | None = None,
        dgate: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Flash-attention's backward of step s for heads h0..: (d scores, d values) from the
        raw scores (consumed), the key blocks' values [B, H - h0, n - s, bk, D], and the query
        blocks' dO [B, H - h0, G, n - s, bq, D], log-sum-exp and rowsum(dO * O). Adds the
        bias gradient into `dbias` (shaped like `self.bias`) and the forget gates' into
        `dgate` ([B, H, G, n, block]: + row sums as queries, - column sums as keys) when given."""
        probs = self.numerators(self.logits(s, scores, h0), lse)
        dvalues = torch.einsum("bhgcij,bhgcid->bhcjd", probs, dout)
        dprobs = torch.einsum("bhgcid,bhcjd->bhgcij", dout, values)
        dscores = dprobs.sub_(row_dot[..., None]).mul_(probs)
        if dbias is not None:
            index = (s * self.block + self.local).clamp(0, dbias.shape[-1] - 1).flatten()
            dbias[h0:].index_add_(-1, index, dscores.sum((0, 3)).flatten(2))
        if dgate is not None:
            dgate[:, h0:, :, s:] += dscores.sum(-1)
            dgate[:, h0:, :, : self.n - s] -= dscores.sum(-2)
        return dscores, dvalues

    def bias_gradient(self, dbias: Tensor, bias: Tensor) -> Tensor:
        """`dbias` accumulated by `score_gradients`, shaped and ordered like `bias`."""
        return self.reorder_heads(dbias.flatten(0, 1), 0, back=True).reshape_as(bias).to(bias.dtype)


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
) -> Iterator[tuple[int, int, Tensor]]:
    """(s, h0, raw scores [B, H - h0, G, n - s, block, block]) for every step of the sweep and
    the heads h0.. it visits, xPos decay included (bias and masks are `sweep.logits`'s)."""
    qb, kb = sweep.query_blocks(q, scale), sweep.blocks(k)
    if decay is not None:
        q_factor, k_factor = _decay_factors(decay, sweep.block, sweep.dtype)
        kb = kb * k_factor
    for s in sweep.steps():
        h0 = sweep.first_head(s)
        qs = qb[:, h0:, :, s:]
        if decay is not None:
            qs = qs * _query_decay(q_factor, decay, s, sweep.block)
        yield s, h0, torch.einsum("bhgcid,bhcjd->bhgcij", qs, kb[:, h0:, : sweep.n - s])


class _BlockwiseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, gate, decay, doc_ids, reach, scale, window, block):
        sweep = DiagonalSweep(
            q, k, block=block, doc_ids=doc_ids, bias=bias, window=window, reach=reach, gate=gate
        )
        vb = sweep.blocks(v)
        for s, h0, scores in step_scores(sweep, q, k, decay, scale):
            sweep.fold(s, scores, vb[:, h0:, : sweep.n - s], h0)
        out = sweep.unblock(sweep.output()).to(q.dtype)
        ctx.save_for_backward(q, k, v, bias, gate, decay, doc_ids, out, sweep.log_sum_exp())
        ctx.scale, ctx.window, ctx.block = scale, window, block
        ctx.head_steps = sweep.head_steps_by_head
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, bias, gate, decay, doc_ids, out, lse = ctx.saved_tensors
        scale, block = ctx.scale, ctx.block
        sweep = DiagonalSweep(
            q, k, block=block, doc_ids=doc_ids, bias=bias, window=ctx.window, gate=gate,
            head_steps=ctx.head_steps,
        )  # fmt: skip
        qb, kb, vb = sweep.query_blocks(q, scale), sweep.blocks(k), sweep.blocks(v)
        dob, row_dot = sweep.output_gradient(dout, out)
        k_factor = 1.0
        if decay is not None:
            q_factor, k_factor = _decay_factors(decay, block, sweep.dtype)
            kb = kb * k_factor
        dq, dk, dv = torch.zeros_like(qb), torch.zeros_like(kb), torch.zeros_like(vb)
        dbias = torch.zeros_like(sweep.bias) if ctx.needs_input_grad[3] else None
        dgate = torch.zeros_like(sweep.gate_local) if ctx.needs_input_grad[4] else None
        n = sweep.n
        for s in sweep.steps():
            h0 = sweep.first_head(s)
            qs, q_step = qb[:, h0:, :, s:], 1.0
            if decay is not None:
                q_step = _query_decay(q_factor, decay, s, block)
                qs = qs * q_step
            ks = kb[:, h0:, : n - s]
            dscores, dvalues = sweep.score_gradients(
                s, torch.einsum("bhgcid,bhcjd->bhgcij", qs, ks), vb[:, h0:, : n - s],
                dob[:, h0:, :, s:], lse[:, h0:, :, s:], row_dot[:, h0:, :, s:], h0, dbias,
                dgate,
            )  # fmt: skip
            dv[:, h0:, : n - s] += dvalues
            dq[:, h0:, :, s:] += torch.einsum("bhgcij,bhcjd->bhgcid", dscores, ks) * q_step
            dk[:, h0:, : n - s] += torch.einsum("bhgcij,bhgcid->bhcjd", dscores, qs)
        dq = sweep.unblock(dq * scale).to(q.dtype)
        dk = sweep.unblock(dk * k_factor).to(k.dtype)
        dv = sweep.unblock(dv).to(v.dtype)
        if dbias is not None:
            dbias = sweep.bias_gradient(dbias, bias)
        if dgate is not None:
            dgate = sweep.gate_gradient(dgate, gate)
        return dq, dk, dv, dbias, dgate, None, None, None, None, None, None


def blockwise_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float | None = None,
    bias: Tensor | None = None,
    gate: Tensor | None = None,
    window: int | None = None,
    decay: Tensor | None = None,
    doc_ids: Tensor | None = None,
    reach: Tensor | None = None,
    block: int = 64,
) -> Tensor:
    """Causal softmax attention with O(T x block) memory, forward and backward.

    q [B, T, HQ, D]; k, v [B, T, H, D] with HQ a multiple of H (grouped-query heads).
    bias [HQ, >=T]: added to the logit of distance i - j (a table indexed by distance).
    gate [B, T, HQ]: cumulative log forget gates F (FoX); F_i - F_j is added to logit_ij.
    window: keep only i - j < window. decay [D/2]: per-pair log-decay (xPos): the pair p
    contribution to the logit of distance n is multiplied by exp(decay[p] * n); not learned.
    doc_ids [B, T]: no attention across documents. reach [B, HQ]: key blocks entirely at
    distance >= reach are skipped (`kernels.alibi_reach`). Returns [B, T, HQ, D] in q's dtype.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _BlockwiseAttention.apply(
        q, k, v, bias, gate, decay, doc_ids, reach, scale, window, block
    )
