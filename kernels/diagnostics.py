"""What attention does, measured blockwise: its mass by distance and its entropy.

For every query i the attention row a_ij (j <= i) is a distribution over distances n = i - j.
`attention_statistics` sums, over the queries of a batch, the mass a_ij at each distance and the
entropy -sum_j a_ij log a_ij, per query head. It reuses `kernels.blockwise.DiagonalSweep` for
the block geometry, the bias and the masks, in two sweeps: the first keeps only the online
softmax's running max and sum (the log-sum-exp of every row), the second recomputes each step's
logits and normalises them with it. The largest tensor is [B, HQ, T, block], as in the
attention itself; nothing of size T x T is ever formed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kernels.angles import rotate
from kernels.blockwise import DiagonalSweep, exp_or_zero, step_scores

PATH_UNSUPPORTED = (
    "PaTH's logits come from the Householder transport inside kernels.path.path_attention, "
    "which exposes no per-step scores to measure"
)


@dataclass
class AttentionStatistics:
    """Sums over queries, per query head (HQ)."""

    mass: Tensor  # [HQ, T] float64: attention mass at distance n, summed over queries
    entropy: Tensor  # [HQ] float64: attention entropy (nats), summed over queries
    queries: int  # how many queries the sums run over (B x T)


def attention_statistics(
    q: Tensor,
    k: Tensor,
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
) -> AttentionStatistics:
    """Mass by distance and entropy of the attention that `kernels.attention` computes with the
    same arguments (v is not needed; rotate_values does not change the weights; skip_eps is
    not applied: the statistics are exact, far mass included).

    q [B, T, HQ, D], k [B, T, H, D]. Raises NotImplementedError for PaTH transport.
    """
    if transport is not None:
        raise NotImplementedError(PATH_UNSUPPORTED)
    B, T, _, D = q.shape
    scale = D**-0.5 if scale is None else scale
    if angles is not None:
        q, k = rotate(q, angles), rotate(k, angles)
    common = dict(block=block, doc_ids=doc_ids, bias=bias, gate=gate, window=window)

    # Sweep 1: each row's log-sum-exp. Zero-width values make `fold` keep only max and sum.
    sweep = DiagonalSweep(q[..., :0], k, **common)
    nothing = sweep.blocks(k[..., :0])
    for s, _, scores in step_scores(sweep, q, k, decay, scale):
        sweep.fold(s, scores, nothing[:, :, : sweep.n - s])
    lse = sweep.log_sum_exp()  # [B, H, G, n, block]

    # Sweep 2: probabilities, binned by distance; entropy = sum_j p_ij (lse_i - logit_ij).
    # At step s the distance is s * block + (i - j) whatever the query block, so each step's
    # probabilities are summed over batch and blocks before binning.
    H, G, block = k.shape[2], sweep.groups, sweep.block
    local = torch.arange(block, device=q.device)
    local = local[:, None] - local[None, :]
    padded = sweep.n * block - T  # padding query rows at the end of the last block
    mass = torch.zeros(H, G, T, dtype=torch.float64, device=q.device)
    entropy = torch.zeros(H, G, dtype=torch.float64, device=q.device)
    for s, _, scores in step_scores(sweep, q, k, decay, scale):
        logits = sweep.logits(s, scores)
        row_lse = lse[..., s:, :, None]
        probs = exp_or_zero(logits - row_lse)
        if padded:
            probs[..., -1, block - padded :, :] = 0
        # Masked entries have probability exactly 0 and a finite logit: they add nothing.
        entropy += (probs * (row_lse - logits)).sum((0, 3, 4, 5)).double()
        index = (s * block + local).clamp(0, T - 1).flatten()
        mass.index_add_(-1, index, probs.sum((0, 3)).flatten(2).double())
    return AttentionStatistics(mass.flatten(0, 1), entropy.flatten(), B * T)
