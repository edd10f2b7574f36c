"""The model's no-grad forward a chunk of positions at a time: evaluation at lengths far beyond
the trained one (docs/design.md, "Extrapolation evaluation"; README "Long-context evaluation").

In a forward without gradients only two kinds of state must span every position: the residual
stream, and the current layer's keys and values with what the scheme attends through (angles,
PaTH's Householder vectors, document ids, the forget gates' cumulative sums, the bias table).
Everything else runs `chunk` positions at a time, per layer: the norms and projections, the
scheme's per-token inputs, the queries, the attention output, the MLP, and (the caller's) LM
head and loss. The residual stream is updated in place, chunk by chunk: a chunk's attention
reads only keys and values, which were made from the layer's input before any chunk changed it.

The attention of a chunk of queries runs against the keys before it in tiles of `chunk` keys,
nearest first, with an online softmax in at least float32: the semantics of `kernels.attention`
(the reference `kernels.reference.reference_attention`) for every mechanism, including PaTH's
transport (queries carried back over each tile by its compact UT form, `kernels.path`) and the
proven skipping of far tiles for ALiBi heads and forget gates (`kernels.alibi_reach`). Its
working set is O(chunk x chunk) per head, so the whole forward holds the residual stream, the
keys and values and O(chunk) more (`evaluation.extrapolation.forward_bytes` counts it).

Under sequence parallelism (`model.sequence_parallel`, N ranks) each rank holds its 1/N of the
residual stream, and the keys, values and scheme inputs go through the same all-to-all as in
training (`SequenceParallel.to_heads`): each rank keeps the whole sequence's keys of 1/N of the
heads. Each chunk of queries crosses over the same way, every rank's chunk at once, attends to
the rank's heads, and comes back (`SequenceParallel.to_tokens`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor, nn

import kernels
from kernels.alibi_reach import ROUNDING_MARGIN
from kernels.blockwise import exp_or_zero
from kernels.path import ut_transform
from model.config import SCHEMES
from model.positions import sinusoidal_embedding
from model.schemes import query_heads

EVAL_CHUNK = 1024  # positions per chunk (and keys per tile) of the chunked forward


def chunks(length: int, chunk: int) -> Iterator[slice]:
    """Consecutive slices of `chunk` positions (the last one shorter) covering [0, length)."""
    for start in range(0, length, chunk):
        yield slice(start, min(start + chunk, length))


@torch.no_grad()
def chunked_hidden(
    model: nn.Module, tokens: Tensor, doc_ids: Tensor | None = None, chunk: int = EVAL_CHUNK
) -> Tensor:
    """The final normalised hidden states [B, T, d_model] of tokens [B, T] for `model` (a
    `model.transformer.Transformer`), equal to `model(tokens, doc_ids, head=False)`,
    computed `chunk` positions at a time (module docstring). The attention probe
    (`Transformer.attention_probe`) sees the whole layer's q, k, v as in the plain forward
    (once the layer has attended: its statistics do not depend on the order).
    Under sequence parallelism: this rank's slice [B, T/N, d_model], as the plain forward's."""
    if chunk < 1:
        raise ValueError(f"chunk={chunk}: the chunked forward needs at least 1 position a chunk")
    sp = model.sequence_parallel
    B, T = tokens.shape
    if sp is not None and T % sp.size:
        raise ValueError(f"sequence length {T} is not a multiple of sequence_parallel={sp.size}")
    positions = kernels.document_positions(doc_ids, B, T, tokens.device)
    local_tokens, local_positions = tokens, positions
    if sp is not None:
        local_tokens, local_positions = sp.local(tokens), sp.local(positions)
    n = local_tokens.shape[1]
    x = torch.empty(B, n, model.cfg.d_model, dtype=model.embed.weight.dtype, device=tokens.device)
    absolute = SCHEMES[model.cfg.scheme].absolute
    for part in chunks(n, chunk):
        x[:, part] = model.embed(local_tokens[:, part])
        if absolute:
            embedding = sinusoidal_embedding(local_positions[:, part], model.cfg.d_model)
            x[:, part] += embedding.to(x.dtype)
    for block in model.blocks:
        _layer(block, x, positions, doc_ids, chunk)
    for part in chunks(n, chunk):
        x[:, part] = model.norm(x[:, part])
    return x


def _layer(
    block: nn.Module, x: Tensor, positions: Tensor, doc_ids: Tensor | None, chunk: int
) -> None:
    """One block (`model.transformer.Block`) on the residual stream x [B, n, d] (the whole
    sequence, or this rank's slice of it under sequence parallelism), in place; positions and
    doc_ids [B, T] are the whole sequence's."""
    attn = block.attn
    cfg, sp = attn.cfg, attn.sequence_parallel
    B, n, _ = x.shape
    k = x.new_empty(B, n, cfg.kv_heads, cfg.head_dim)
    v = torch.empty_like(k)
    inputs: dict[str, Tensor] = {}
    for part in chunks(n, chunk):
        h = block.attn_norm(x[:, part])
        k[:, part] = attn.wk(h).view(B, -1, cfg.kv_heads, cfg.head_dim)
        v[:, part] = attn.wv(h).view(B, -1, cfg.kv_heads, cfg.head_dim)
        for name, value in attn.position.token_inputs(h).items():
            if name not in inputs:
                inputs[name] = value.new_empty(B, n, *value.shape[2:])
            inputs[name][:, part] = value
    heads = q_order = None
    if sp is not None:
        if attn.probe is not None:
            raise ValueError("the attention probe needs whole sequences: unset sequence_parallel")
        order = torch.tensor(sp.head_order(cfg.kv_heads) or range(cfg.kv_heads), device=x.device)
        q_order = query_heads(order, cfg.n_heads // cfg.kv_heads)
        k, v = sp.to_heads(k[:, :, order]), sp.to_heads(v[:, :, order])
        inputs = {name: sp.to_heads(t[:, :, order]) for name, t in inputs.items()}
        heads = torch.tensor(sp.heads(cfg.kv_heads), device=x.device)
    plan = attn.position.plan(inputs, positions, doc_ids, x.dtype, heads)
    del inputs
    # The probe's queries are kept as the chunks make them: a module called for the probe alone
    # would be one more ZeRO-3 gather on this rank than on the others.
    queries = None if attn.probe is None else x.new_empty(B, n, cfg.n_heads, cfg.head_dim)
    keys = PrefixKeys(k, v, plan, doc_ids, cfg.alibi_skip_eps, chunk)
    for part in chunks(n, chunk):
        h = block.attn_norm(x[:, part])
        q = attn.wq(h).view(B, -1, cfg.n_heads, cfg.head_dim)
        if queries is not None:
            queries[:, part] = q
        if sp is None:
            o = keys.attend(q, part.start)
        else:  # every rank's chunk `part`, this rank's heads; back to this rank's tokens
            q = sp.to_heads(q[:, :, q_order])
            size = part.stop - part.start
            o = torch.cat(
                [
                    keys.attend(q[:, r * size : (r + 1) * size], r * n + part.start)
                    for r in range(sp.size)
                ],
                dim=1,
            )
            o = sp.to_tokens(o)[:, :, q_order.argsort()]
        x[:, part] += attn.wo(o.flatten(2))
        x[:, part] += block.mlp(block.mlp_norm(x[:, part]))
    if queries is not None:
        kwargs = dict(plan, doc_ids=doc_ids, skip_eps=cfg.alibi_skip_eps, block=cfg.attn_block)
        attn.probe(attn.layer, queries, k, v, kwargs)


class PrefixKeys:
    """One layer's keys and values over the whole sequence and the scheme's plan (the kwargs of
    `kernels.attention` from `PositionScheme.plan`); `attend` runs a chunk of queries against
    the keys at and before it."""

    def __init__(
        self,
        k: Tensor,
        v: Tensor,
        plan: dict,
        doc_ids: Tensor | None,
        skip_eps: float,
        tile: int,
    ):
        self.k, self.v, self.doc_ids, self.tile = k, v, doc_ids, tile
        self.angles = plan.get("angles")
        self.rotate_values = plan.get("rotate_values", False)
        self.window = plan.get("window")
        self.decay, self.gate = plan.get("decay"), plan.get("gate")
        self.transport = plan.get("transport")
        bias = plan.get("bias")
        self.dtype = torch.promote_types(k.dtype, torch.float32)
        self.scale = k.shape[-1] ** -0.5
        # Far tiles are skipped as kernels.attention skips far blocks: ALiBi heads, or forget
        # gates without a bias; never with xPos decay or PaTH transport.
        skips = skip_eps > 0 and self.decay is None and self.transport is None
        # ALiBi's bias comes from its slopes, tile by tile (no [HQ, T] table); others' tables.
        self.alibi = self.table = self.slopes = None
        if isinstance(bias, kernels.AlibiTable):
            self.alibi = bias.slopes.to(self.dtype)
            if skips and self.gate is None:
                self.slopes = bias.slopes.detach().double()
        elif bias is not None:
            self.table = bias.to(self.dtype)
        self.gate_skips = skips and self.gate is not None and bias is None
        self.skip_eps = skip_eps
        self.key_norm = None
        if self.slopes is not None or self.gate_skips:
            norms = torch.linalg.vector_norm(k, dim=-1, dtype=self.dtype).amax(dim=1).double()
            self.key_norm = norms  # [B, H]

    def attend(self, q: Tensor, start: int) -> Tensor:
        """Causal attention of queries q [B, C, HQ, D] at positions start.. against the keys
        at and before them; [B, C, HQ, D] in q's dtype."""
        B, C, HQ, D = q.shape
        H = self.k.shape[2]
        G = HQ // H
        end = start + C
        if self.angles is not None:
            q = kernels.rotate(q, self.angles[:, start:end])
        queries = (q * self.scale).to(self.dtype).view(B, C, H, G, D).permute(0, 2, 3, 1, 4)
        row_max = torch.full((B, H, G, C), torch.finfo(self.dtype).min, dtype=self.dtype,
                             device=q.device)  # fmt: skip
        row_sum = torch.zeros_like(row_max)
        acc = torch.zeros((B, H, G, C, D), dtype=self.dtype, device=q.device)
        bound = self._logit_bound(queries) if self.key_norm is not None else None
        carried = None
        first = 0 if self.window is None else max(0, start - self.window + 1)
        # Tiles of keys nearest first: the queries' own positions, then `tile` keys at a time.
        for hi in [end, *range(start, first, -self.tile)]:
            lo = start if hi == end else max(first, hi - self.tile)
            if bound is not None and self._negligible(bound, start, end, lo, hi):
                break  # every farther tile is more negligible still
            keys = self._keys(lo, hi)
            if self.transport is None:
                scores = torch.einsum("bhgid,bhjd->bhgij", self._decayed(queries, start, hi), keys)
            else:
                scores, carried = self._transported(queries, carried, keys, lo, hi)
            scores = self._logits(scores, start, end, lo, hi)
            new_max = torch.maximum(row_max, scores.amax(dim=-1))
            rescale = exp_or_zero(row_max - new_max)
            probs = exp_or_zero(scores - new_max[..., None])
            row_sum = row_sum * rescale + probs.sum(dim=-1)
            acc = acc * rescale[..., None] + torch.einsum(
                "bhgij,bhjd->bhgid", probs, self._values(lo, hi)
            )
            row_max = new_max
        out = (acc / row_sum[..., None]).permute(0, 3, 1, 2, 4).reshape(B, C, HQ, D).to(q.dtype)
        if self.angles is not None and self.rotate_values:
            out = kernels.rotate(out, -self.angles[:, start:end])
        return out

    def _keys(self, lo: int, hi: int) -> Tensor:
        """Keys lo..hi-1, rotated (and xPos-decayed relative to hi), [B, H, n, D]."""
        k = self.k[:, lo:hi]
        if self.angles is not None:
            k = kernels.rotate(k, self.angles[:, lo:hi])
        k = k.to(self.dtype).transpose(1, 2)
        if self.decay is not None:  # exp(decay (hi - j)): at most exp(|decay| tile)
            distance = torch.arange(hi - lo, 0, -1, device=k.device, dtype=self.dtype)
            k = k * torch.exp(self._pair_decay() * distance[:, None])
        return k

    def _values(self, lo: int, hi: int) -> Tensor:
        v = self.v[:, lo:hi]
        if self.angles is not None and self.rotate_values:
            v = kernels.rotate(v, self.angles[:, lo:hi])
        return v.to(self.dtype).transpose(1, 2)

    def _pair_decay(self) -> Tensor:
        return torch.cat((self.decay, self.decay)).to(self.dtype)

    def _decayed(self, queries: Tensor, start: int, hi: int) -> Tensor:
        """Queries times exp(decay (i - hi)) for xPos (the keys carry exp(decay (hi - j)))."""
        if self.decay is None:
            return queries
        C = queries.shape[3]
        distance = torch.arange(C, device=queries.device, dtype=self.dtype) + (start - hi)
        return queries * torch.exp(self._pair_decay() * distance[:, None])

    def _logits(self, scores: Tensor, start: int, end: int, lo: int, hi: int) -> Tensor:
        """Scores [B, H, G, C, n] of queries start..end-1 and keys lo..hi-1 with the distance
        bias, the forget gates and the masks (causal, window, documents) applied, in place."""
        B, H, G = scores.shape[:3]
        i = torch.arange(start, end, device=scores.device)
        j = torch.arange(lo, hi, device=scores.device)
        distance = i[:, None] - j[None, :]
        if self.alibi is not None:  # -m n, as `kernels.AlibiTable` makes its table
            bias = -self.alibi[:, None, None] * distance.clamp(min=0).to(self.dtype)
            scores += bias.view(H, G, *distance.shape)
        elif self.table is not None:
            table = self.table[:, distance.clamp(0, self.table.shape[-1] - 1)]
            scores += table.view(H, G, *distance.shape)
        if self.gate is not None:  # F_i - F_j, differenced in float64
            F_i, F_j = self.gate[:, start:end], self.gate[:, lo:hi]
            across = F_i.transpose(1, 2)[..., :, None] - F_j.transpose(1, 2)[..., None, :]
            scores += across.to(scores.dtype).view(B, H, G, *distance.shape)
        keep = distance >= 0
        if self.window is not None:
            keep = keep & (distance < self.window)
        keep = keep.expand(B, 1, 1, *distance.shape)
        if self.doc_ids is not None:
            same = self.doc_ids[:, start:end, None] == self.doc_ids[:, None, lo:hi]
            keep = keep & same[:, None, None]
        return scores.masked_fill_(~keep, torch.finfo(scores.dtype).min)

    def _logit_bound(self, queries: Tensor) -> Tensor:
        """a = 2 scale max|q| max|k| per row and query head over this chunk's queries (already
        scaled) and all keys, [B, HQ] float64 (`kernels.alibi_reach`)."""
        q_norm = torch.linalg.vector_norm(queries, dim=-1).amax(dim=-1).double().flatten(1)
        G = q_norm.shape[1] // self.key_norm.shape[1]
        return 2 * ROUNDING_MARGIN * q_norm * self.key_norm.repeat_interleave(G, dim=1)

    def _negligible(self, bound: Tensor, start: int, end: int, lo: int, hi: int) -> bool:
        """Whether keys lo..hi-1 move every output of queries start..end-1 by at most
        skip_eps x max|v| (`kernels.alibi_reach`'s bounds, with this tile's nearest pair)."""
        nearest = start - (hi - 1)
        if nearest < 1:
            return False
        if self.slopes is not None:
            m = self.slopes.to(bound.device)
            mass = bound - m * nearest - torch.log(-torch.expm1(-m))
            return bool((mass <= math.log(self.skip_eps / 2)).all())
        length = self.gate.shape[1]
        widest = (self.gate[:, start] - self.gate[:, hi - 1]).double()  # F non-increasing
        return bool((bound + widest <= math.log(self.skip_eps / (2 * length))).all())

    def _transported(
        self, queries: Tensor, carried: Tensor | None, keys: Tensor, lo: int, hi: int
    ) -> tuple[Tensor, Tensor]:
        """PaTH: (scores [B, H, G, C, n] of the queries against keys lo..hi-1 through the
        Householder products between them, the queries carried back to lo). The first call is
        the diagonal tile (carried None: the queries' own positions); each later one the tile
        just before the last."""
        w_all, beta_all = self.transport
        w = w_all[:, lo:hi].to(self.dtype).transpose(1, 2)  # [B, H, n, D]
        u = ut_transform(w, beta_all[:, lo:hi].to(self.dtype).transpose(1, 2))  # [B, H, n, n]
        n = hi - lo
        lower = torch.ones(n, n, dtype=torch.bool, device=keys.device).tril()
        kw = torch.einsum("bhjd,bhed->bhje", keys, w)
        # Keys carried to the tile's end: H_{hi-1} ... H_{j+1} k_j.
        k_out = keys - torch.einsum("bhje,bhea,bhad->bhjd", kw * ~lower, u, w)
        if carried is None:  # the diagonal tile: queries and keys at the same positions
            qw = torch.einsum("bhgid,bhad->bhgia", queries, w)
            scores = torch.einsum("bhgid,bhjd->bhgij", queries, keys) - torch.einsum(
                "bhgia,bhea,bhje->bhgij", qw * lower, u, kw * ~lower
            )
            # Queries carried to the tile's start: H_lo ... H_i q_i.
            carried = queries - torch.einsum("bhgie,bhae,bhad->bhgid", qw * lower, u, w)
            return scores, carried
        scores = torch.einsum("bhgid,bhjd->bhgij", carried, k_out)
        proj = torch.einsum("bhgid,bhad->bhgia", carried, w)
        carried = carried - torch.einsum("bhgia,bhea,bhed->bhgid", proj, u, w)
        return scores, carried
