"""Initialising weights that DeepSpeed ZeRO-3 may already have partitioned.

Under `deepspeed.zero.Init` every module's parameters are partitioned over the ranks as soon as
its constructor returns, so a parent that initialises a child's weights afterwards would write
into empty tensors. `full` gathers the partitioned ones among `params` for the `with` block and
partitions them again on exit, rank 0's values kept (every rank draws the same numbers from the
same seed anyway). Plain tensors pass through untouched, so the model needs no DeepSpeed.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

from torch import nn


def is_partitioned(param: nn.Parameter) -> bool:
    """Whether ZeRO-3 manages `param` (its data is this rank's partition, not the tensor)."""
    return hasattr(param, "ds_id")


def full(*params: nn.Parameter) -> AbstractContextManager:
    """Within the block, `params` hold their full values and writes to them are kept."""
    partitioned = [p for p in params if is_partitioned(p)]
    if not partitioned:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0)
