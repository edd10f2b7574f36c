"""Sequence parallelism (DeepSpeed-Ulysses): a sequence no single device holds, for every scheme.

The N ranks of a sequence-parallel group read the same packed sequence and each keeps a
contiguous 1/N of its tokens: embeddings, projections, MLPs and the loss see that slice only.
Around attention, DeepSpeed's all-to-all (`deepspeed.sequence.layer`) trades the slice of
every head for the whole sequence of 1/N of the heads: q, k, v through its
`DistributedAttention`, and the scheme's per-token inputs (learned angle increments, PaTH's
projections and beta) through the same `_SeqAllToAll`. The head-sharded side therefore runs
the scheme over the whole length, unchanged: angles accumulated over each document from its
first token, ALiBi distances, windows, PaTH's transport and its short convolution, document
masks. The output goes back the same way. The key/value heads are dealt to the ranks in a
snake (`SequenceParallel.head_order`) so that ALiBi skipping's work is shared evenly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class SequenceParallel:
    """This rank's place in its sequence-parallel group of `size` ranks."""

    group: dist.ProcessGroup
    size: int
    rank: int  # index within the group: which slice of the sequence, which heads

    def local(self, x: Tensor, dim: int = 1) -> Tensor:
        """This rank's contiguous slice of x along `dim` (the sequence)."""
        n = x.shape[dim] // self.size
        return x.narrow(dim, self.rank * n, n)

    def head_order(self, count: int) -> list[int] | None:
        """The `count` key/value heads in the order the all-to-all deals them, 1/N to each rank
        (rank r: `heads(count)`), or None for the heads' own order. ALiBi skipping makes steep
        heads cheap and shallow ones dear, and the slopes fall with the head index, so the
        heads are dealt in a snake over the ranks (0, 1, .., N-1, N-1, .., 0, ..): each rank
        gets steep and shallow heads alike and no rank waits on one holding all the dear ones.
        None when every rank gets one head."""
        if count == self.size:
            return None
        N = self.size
        rank_of = [h % N if h // N % 2 == 0 else N - 1 - h % N for h in range(count)]
        return sorted(range(count), key=lambda h: (rank_of[h], h))

    def heads(self, count: int) -> list[int]:
        """The key/value heads of `count` that this rank attends with after the all-to-all."""
        n = count // self.size
        order = self.head_order(count) or list(range(count))
        return order[self.rank * n : (self.rank + 1) * n]

    def to_heads(self, x: Tensor) -> Tensor:
        """[B, T/N, H, ...] (this rank's tokens, every head) -> [B, T, H/N, ...] (every token,
        this rank's heads); differentiable."""
        from deepspeed.sequence.layer import _SeqAllToAll

        return _SeqAllToAll.apply(self.group, x, 2, 1, 0)

    def to_tokens(self, x: Tensor) -> Tensor:
        """The inverse of `to_heads`: [B, T, H/N, ...] -> [B, T/N, H, ...]; differentiable."""
        from deepspeed.sequence.layer import _SeqAllToAll

        return _SeqAllToAll.apply(self.group, x, 1, 2, 0)

    def attention(self, local_attention: Callable[..., Tensor]) -> Callable[..., Tensor]:
        """`local_attention(q, k, v, *args)` on the whole sequence of this rank's heads, wrapped
        by DeepSpeed's DistributedAttention: called with this rank's tokens of every head, it
        returns them as [B, T/N, HQ, D]."""
        from deepspeed.sequence.layer import DistributedAttention

        layer = DistributedAttention(local_attention, self.group, scatter_idx=2, gather_idx=1)

        def attend(q: Tensor, k: Tensor, v: Tensor, *args) -> Tensor:
            return layer(q, k, v, 0, None, *args)

        return attend
