"""ALiBi's reach: the distance beyond which keys can be skipped with a proven error bound.

For one head, with logits l_ij = scale q_i . k_j - m (i - j) over the keys j that query i sees
(q and k rotated by any angles, learned or not: rotations preserve norms), every query sees its
own key, so its softmax denominator is Z_i >= exp(l_ii) and

    p_ij = exp(l_ij) / Z_i <= exp(l_ij - l_ii) <= exp(scale |q_i| (|k_j| + |k_i|) - m (i - j))
         <= exp(a - m (i - j)),   a = 2 scale max_i |q_i| max_j |k_j|  (over the row).

The keys at distance d >= R then hold at most the mass

    delta_i <= exp(a) sum_{d >= R} exp(-m d) = exp(a - m R) / (1 - exp(-m)).

Dropping keys of total mass delta and renormalising moves the output by at most
2 delta max_j |v_j|: o - o' = sum_dropped p_j v_j - delta / (1 - delta) sum_kept p_j v_j, each
term at most delta max|v| (rotated values too: rotations preserve |v_j|). So skipping every key
at distance >= R with exp(a - m R) / (1 - exp(-m)) <= eps / 2 keeps |o_i - o'_i| <= eps max|v|:
eps is the output's error relative to the largest value. Documents and windows only remove keys
(never query i's own), so the bound holds for packed documents; with grouped-query heads a is
taken per query head over the keys of its key/value head. The backward pass, recomputing
p_ij <= the same bound, changes each gradient term by the same small mass.

A forget gate (FoX) replaces -m (i - j) by F_i - F_j, F the cumulative log forget gates
(non-increasing along the sequence). Then p_ij <= exp(a + F_i - F_j), and skipping every key
at distance >= R with a + max_i (F_i - F_{i-R}) <= log(eps / (2 T)) drops at most T keys of
mass eps / (2 T) each: delta_i <= eps / 2 and the same |o_i - o'_i| <= eps max|v|. Since F is
non-increasing, max_i (F_i - F_{i-R}) falls as R grows, so the least such R is found by
bisection, per row and query head. F across a document boundary is only ever compared where a
mask removes the pair, so the maximum over all i may include such pairs: it only widens R.

The fused kernel skips at token granularity with per-block norms (`alibi_bounds`): for the
query block I of REACH_BLOCK tokens (a fixed grid, not the kernels' tiles) and a distance R,
every dropped pair (i in I, j <= i - R) has

    l_ij - l_ii <= scale Q_I (K_{<= last(I) - R} + K_I) =: a_I(R),

Q_I and K_I the largest |q| and |k| of block I's tokens, K_{<= p} the largest |k_j| over
j <= p. a_I(R) falls as R grows, so the least R_I with exp(a_I(R) - m R) / (1 - exp(-m)) <=
eps / 2 is found by bisection, and the same eps max|v| bound holds for every row of I. One
outlier token then widens the reach of its own block and of the blocks whose far keys include
it, not of the whole row. Query i sees the keys j >= first_i = i - R_I + 1 (within its
document); first is made non-decreasing (a suffix minimum: it only lowers first, keeping more
keys), so the queries that see key j are a run j <= i < ends_j, and forward and backward use
the same per-token bounds, whatever their tiles: the backward is the exact gradient of the
forward that was computed. docs/design.md bounds each gradient's error.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.angles import document_starts

REACH_BLOCK = 64  # tokens per query block of the per-block norms: fixed, not the kernels' tiles
DEFAULT_SKIP_EPS = 1e-6  # output error relative to max |v|, below float32's attention noise
# Rotated bfloat16 operands are rounded after rotation: their norms can exceed the inputs' by
# 2^-8 each. Widening a by 2^-6 keeps the bound above what the kernels compute.
ROUNDING_MARGIN = 1 + 2**-6


def alibi_reach(q: Tensor, k: Tensor, slopes: Tensor, scale: float, eps: float) -> Tensor:
    """Per (row, query head) distance R: keys at i - j >= R carry output error <= eps max|v|.

    q [B, T, HQ, D], k [B, T, H, D], slopes [HQ] (m_h >= 0). Returns int64 [B, HQ] in [1, T];
    T means nothing is skipped (eps = 0, a zero slope, or a bound that reaches the start).
    Computed on q's device, without a host synchronisation.
    """
    B, T, HQ, _ = q.shape
    if eps <= 0:
        return torch.full((B, HQ), T, dtype=torch.int64, device=q.device)
    a = _logit_bound(q, k, scale)
    m = slopes.detach().to(device=q.device, dtype=torch.float64).expand(B, HQ)
    # exp(a - m R) / (1 - exp(-m)) <= eps / 2  <=>  R >= (a - log(eps / 2) - log(1 - e^-m)) / m
    needed = (a - math.log(eps / 2) - torch.log(-torch.expm1(-m))) / m
    reach = torch.where(m > 0, needed.ceil(), torch.full_like(needed, T))
    return reach.clamp(1, T).to(torch.int64)


def gate_reach(q: Tensor, k: Tensor, gate: Tensor, scale: float, eps: float) -> Tensor:
    """`alibi_reach` for forget gates: gate [B, T, HQ] the cumulative log forget gates F
    (non-increasing in t). Returns int64 [B, HQ] in [1, T], T meaning nothing is skipped.
    O(T log T) per row and head, on q's device, without a host synchronisation."""
    B, T, HQ, _ = q.shape
    if eps <= 0:
        return torch.full((B, HQ), T, dtype=torch.int64, device=q.device)
    allowed = math.log(eps / (2 * T)) - _logit_bound(q, k, scale)  # [B, HQ]
    gate = gate.detach().double()
    t = torch.arange(T, device=q.device)[None, :, None]

    def widest(distance: Tensor) -> Tensor:
        """max_i (F_i - F_{i - R}) over i >= R, for R = distance [B, HQ] (at least 1)."""
        earlier = gate.gather(1, (t - distance[:, None]).clamp(min=0).expand(B, T, HQ))
        return torch.where(t >= distance[:, None], gate - earlier, -math.inf).amax(dim=1)

    # Bisection for the least R in [1, T] with widest(R) <= allowed (widest(T) = -inf), a
    # fixed number of halvings: no host synchronisation.
    low = torch.ones(B, HQ, dtype=torch.int64, device=q.device)
    high = torch.full_like(low, T)
    for _ in range(T.bit_length()):
        middle = (low + high) // 2
        fits = widest(middle) <= allowed
        high = torch.where(fits, middle, high)
        low = torch.where(fits, low, middle + 1)
    return high


def _logit_bound(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """a = 2 scale max_i |q_i| max_j |k_j| per row and query head, [B, HQ] float64: no
    logit of the row differs from the query's own by more (rotations preserve norms)."""
    # Norms accumulated in at least float32 without copying q or k; ROUNDING_MARGIN covers it.
    dtype = torch.promote_types(q.dtype, torch.float32)
    q_norm = torch.linalg.vector_norm(q.detach(), dim=-1, dtype=dtype).amax(dim=1).double()
    k_norm = torch.linalg.vector_norm(k.detach(), dim=-1, dtype=dtype).amax(dim=1).double()
    k_norm = k_norm.repeat_interleave(q.shape[2] // k.shape[2], dim=1)
    return 2 * scale * ROUNDING_MARGIN * q_norm * k_norm


def block_reach(q: Tensor, k: Tensor, slopes: Tensor, scale: float, eps: float) -> Tensor:
    """Per (row, query block of REACH_BLOCK tokens, query head) distance R_I: keys at i - j >=
    R_I move the output of every query i of block I by at most eps max|v| (module docstring).

    q [B, T, HQ, D], k [B, T, H, D], slopes [HQ]. Returns int64 [B, ceil(T / REACH_BLOCK), HQ];
    a block's R_I reaching back to position 0 means it skips nothing. No host synchronisation.
    """
    B, T, HQ, _ = q.shape
    n = -(-T // REACH_BLOCK)
    last = (torch.arange(1, n + 1, device=q.device) * REACH_BLOCK).clamp(max=T) - 1  # [n]
    everything = (last + 1)[None, :, None].expand(B, n, HQ)
    if eps <= 0:
        return everything.clone()
    dtype = torch.promote_types(q.dtype, torch.float32)  # see ROUNDING_MARGIN
    q_norm = torch.linalg.vector_norm(q.detach(), dim=-1, dtype=dtype).double()  # [B, T, HQ]
    k_norm = torch.linalg.vector_norm(k.detach(), dim=-1, dtype=dtype).double()
    k_norm = k_norm.repeat_interleave(HQ // k.shape[2], dim=2)
    padding = (0, 0, 0, n * REACH_BLOCK - T)
    q_block = F.pad(q_norm, padding).view(B, n, REACH_BLOCK, HQ).amax(2)  # Q_I
    k_block = F.pad(k_norm, padding).view(B, n, REACH_BLOCK, HQ).amax(2)  # K_I
    k_prefix = k_norm.cummax(dim=1).values  # K_{<= p}
    m = slopes.detach().to(device=q.device, dtype=torch.float64)
    # exp(a - m R) / (1 - e^-m) <= eps / 2  <=>  a - m R <= log(eps / 2) + log(1 - e^-m);
    # a zero slope gives -inf: only "nothing dropped" fits.
    allowed = math.log(eps / 2) + torch.log(-torch.expm1(-m))
    low, high = torch.ones_like(everything), everything.clone()  # high always fits
    for _ in range(T.bit_length()):  # a fixed number of halvings: no host synchronisation
        middle = (low + high) // 2
        farthest = last[None, :, None] - middle  # the last key a distance >= middle drops
        far_norm = k_prefix.gather(1, farthest.clamp(min=0))
        bound = scale * ROUNDING_MARGIN * q_block * (far_norm + k_block)
        fits = (farthest < 0) | (bound - m * middle <= allowed)
        high = torch.where(fits, middle, high)
        low = torch.where(fits, low, middle + 1)
    return high


def alibi_bounds(
    q: Tensor,
    k: Tensor,
    slopes: Tensor,
    scale: float,
    eps: float,
    starts: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Token-level visibility with skipping: query i sees the keys first[b, hq, i] <= j <= i,
    and key j is seen by the queries j <= i < ends[b, hq, j]; int32 [B, HQ, T] each, first
    non-decreasing in i. starts [B, T]: document starts (`kernels.hybrid.documents`) or None.
    Forward and backward kernels both mask with these, so they sum over the same pairs."""
    B, T, HQ, _ = q.shape
    reach = block_reach(q, k, slopes, scale, eps).repeat_interleave(REACH_BLOCK, dim=1)[:, :T]
    t = torch.arange(T, device=q.device)
    first = (t[None, :, None] - reach + 1).clamp(min=0)  # [B, T, HQ]
    first = first.flip(1).cummin(dim=1).values.flip(1)  # non-decreasing: only keeps more keys
    if starts is not None:
        first = torch.maximum(first, starts.to(first.dtype)[:, :, None])
    first = first.transpose(1, 2).contiguous()  # [B, HQ, T]
    ends = torch.searchsorted(first, t.expand(B, HQ, T).contiguous(), right=True)
    return first.to(torch.int32), ends.to(torch.int32)


def row_reach_bounds(reach: Tensor, T: int, starts: Tensor | None = None) -> Tensor:
    """first [B, HQ, T] of a per-row reach [B, HQ] (`alibi_reach`): i - R + 1, or the document
    start when later. For comparing the per-block bounds with the row-global ones."""
    t = torch.arange(T, device=reach.device)
    first = (t[None, None, :] - reach[:, :, None] + 1).clamp(min=0)
    if starts is not None:
        first = torch.maximum(first, starts.to(first.dtype)[:, None, :])
    return first


def visited_blocks(first: Tensor, block: int) -> Tensor:
    """How many (query tile, key tile) pairs of `block` tokens a kernel visits when query i
    attends keys first[..., i] <= j <= i (first non-decreasing), summed over [B, HQ]: a query
    tile visits the key tiles from its first row's first key to its last row."""
    T = first.shape[-1]
    tile_starts = torch.arange(0, T, block, device=first.device)
    tile_lasts = (tile_starts + block).clamp(max=T) - 1
    return (tile_lasts // block - first[..., tile_starts] // block + 1).sum()


def visited_fraction(
    q: Tensor,
    k: Tensor,
    slopes: Tensor,
    *,
    eps: float,
    scale: float | None = None,
    doc_ids: Tensor | None = None,
    block: int = 128,
) -> Tensor:
    """Fraction of the (query tile, key tile) pairs of `block` tokens that the fused kernel
    visits with skip_eps = eps, relative to the causal (and document) tiles it visits without
    skipping, for these inputs: q [B, T, HQ, D], k [B, T, H, D] (rotated or not: norms are
    the same), slopes [HQ], doc_ids [B, T] or None. A float64 scalar tensor."""
    B, T, HQ, D = q.shape
    scale = D**-0.5 if scale is None else scale
    starts = None if doc_ids is None else document_starts(doc_ids)
    first, _ = alibi_bounds(q, k, slopes, scale, eps, starts)
    zero = torch.zeros(B, HQ, device=q.device, dtype=torch.int64)
    unskipped = row_reach_bounds(zero + T, T, starts)
    return visited_blocks(first, block).double() / visited_blocks(unskipped, block).double()
