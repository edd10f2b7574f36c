"""The theoretical receptive field (TRF) of a distance bias, after arXiv 2307.10156.

A distance bias b(n) weighs the key at distance n by exp(b(n)) before the data-dependent part
of the logit. The paper shows that a transformer extrapolates when the series
S = sum_n exp(b(n)) converges, and measures the reach of the bias, before any training, by the
fewest nearest keys holding 1 - eps of the series:

    TRF(eps, L) = min { t : sum_{n < t} exp(b(n)) >= (1 - eps) sum_{n < L} exp(b(n)) }

for a context of L keys, and TRF(eps) = lim TRF(eps, L) as L grows, finite exactly when the
series converges. Which series converge follows from the closed forms: alibi exp(-m n) and
kerple_power exp(-r1 n^r2) converge (faster than any power); kerple_log (1 + r2 n)^(-r1) is a
p-series, convergent iff r1 > 1; type1 1/(1 + m n) (harmonic) and type2
1/((3 + m n) ln(3 + m n)) (Bertrand's) diverge, and so does sandwich, whose bias stays bounded
below (its terms never go to zero).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from model.schemes import DistanceBias

DECREASING = ("alibi", "kerple_log", "kerple_power", "type1", "type2")  # exp(b(n)) decreasing
MAX_KEYS = 2**20  # the longest partial sum tried when resolving a limit
FAR = 2.0**900  # "infinitely far" for reading off asymptotic exponents in float64


def log_terms(bias: DistanceBias, length: int) -> Tensor:
    """b(n) for n = 0..length-1, float64, [H, length]."""
    return log_terms_at(bias, torch.arange(length, dtype=torch.float64))


def receptive_field(log_terms: Tensor, eps: float, log_total: Tensor | None = None) -> Tensor:
    """TRF(eps, L) from b(0..L-1) [..., L]: the fewest nearest keys holding 1 - eps of the
    series' partial sum up to L (or of exp(log_total) when given). Long [...]."""
    if log_total is None:
        log_total = torch.logsumexp(log_terms, dim=-1)
    covered = torch.logcumsumexp(log_terms, dim=-1) >= math.log1p(-eps) + log_total[..., None]
    return covered.int().argmax(dim=-1) + 1


def converges(bias: DistanceBias) -> Tensor:
    """Per head: whether sum_n exp(b(n)) converges (module docstring). kerple_log's p-series
    exponent r1 is read off the bias far away, r1 = -(b(2n) - b(n)) / ln 2; it must exceed 1
    by more than the float32 rounding of a learned r1 = 1 (kerple_log's initial value)."""
    H = bias.slopes.numel()
    if bias.kind in ("alibi", "kerple_power"):
        return torch.ones(H, dtype=torch.bool)
    if bias.kind == "kerple_log":
        far = log_terms_at(bias, torch.tensor([FAR, 2 * FAR], dtype=torch.float64))
        return ((far[:, 0] - far[:, 1]) / math.log(2) > 1 + 1e-6).cpu()
    if bias.kind in ("type1", "type2", "sandwich"):
        return torch.zeros(H, dtype=torch.bool)
    raise ValueError(f"no convergence rule for the distance bias {bias.kind!r}")


def log_terms_at(bias: DistanceBias, n: Tensor) -> Tensor:
    """b(n) at float64 distances n [K], [H, K]."""
    return bias(n.to(bias.slopes.device))


def _tail_bound(bias: DistanceBias, start: int) -> Tensor:
    """An upper bound of sum_{n >= start} exp(b(n)) for decreasing terms, per head: Cauchy's
    condensation, sum_k 2^k start exp(b(2^k start)) (each dyadic run bounded by its first
    term). Log-space, [H]; +inf when it does not settle."""
    n = start * torch.exp2(torch.arange(1000 - int(math.log2(start)), dtype=torch.float64))
    logs = log_terms_at(bias, n) + torch.log(n).to(bias.slopes.device)  # [H, K]
    return torch.logsumexp(logs, dim=-1).where(logs[:, -1] < logs.max(-1).values - 50, math.inf)


def receptive_field_limit(bias: DistanceBias, eps: float) -> tuple[Tensor, Tensor]:
    """TRF(eps) for infinitely long contexts, per head: (keys [H] long, resolved [H] bool).

    Unresolved heads: the series diverges, or converges so slowly that MAX_KEYS keys plus a
    bound of the remaining tail do not pin the limit down."""
    ok = converges(bias).to(bias.slopes.device) & (bias.kind in DECREASING)
    found = torch.zeros_like(ok, dtype=torch.long)
    resolved = torch.zeros_like(ok)
    length = 1024
    while ok.any() and length <= MAX_KEYS:
        terms = log_terms(bias, length)
        log_partial = torch.logsumexp(terms, dim=-1)
        log_tail = _tail_bound(bias, length)
        # The limit lies between the fields of the partial sum and of partial + tail; when the
        # two agree (and lie inside the partial sum) it is known exactly.
        low = receptive_field(terms, eps, log_partial)
        high = receptive_field(terms, eps, torch.logaddexp(log_partial, log_tail))
        reached = terms.logcumsumexp(-1)[:, -1] >= math.log1p(-eps) + torch.logaddexp(
            log_partial, log_tail
        )
        done = ok & ~resolved & reached & (low == high)
        found = torch.where(done, high, found)
        resolved |= done
        if bool((resolved | ~ok).all()):
            break
        length *= 4
    return found.cpu(), resolved.cpu()
