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
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

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
