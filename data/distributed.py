"""Where this process sits in the job, from the torch.distributed environment variables.

RANK, WORLD_SIZE and LOCAL_WORLD_SIZE (defaults 0, 1, 1). Launchers that do not export
LOCAL_WORLD_SIZE (the deepspeed launcher exports LOCAL_SIZE instead) get it set here, because
streaming reads it to find the ranks that share a node's cache and shared memory.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch.distributed as dist

from data.manifest import DatasetError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world_size: int
    local_world_size: int

    @property
    def local_rank(self) -> int:
        return self.rank % self.local_world_size

    @property
    def node(self) -> int:
        return self.rank // self.local_world_size

    @property
    def num_nodes(self) -> int:
        return self.world_size // self.local_world_size


def data_layout(info: RankInfo, sequence_parallel: int) -> RankInfo:
    """The rank whose data `info` reads when each `sequence_parallel` consecutive ranks share
    one sequence: the group's index among the groups (node-wise when groups lie within nodes)."""
    n = sequence_parallel
    if n == 1:
        return info
    local = info.local_world_size // n if info.local_world_size % n == 0 else info.world_size // n
    return RankInfo(info.rank // n, info.world_size // n, local)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, str(default))
    try:
        return int(value)
    except ValueError:
        raise DatasetError(f"environment variable {name}={value!r} is not an integer") from None


def rank_info() -> RankInfo:
    """This process's rank; sets LOCAL_WORLD_SIZE when a multi-rank launcher left it out."""
    world_size = _env_int("WORLD_SIZE", 1)
    if "LOCAL_WORLD_SIZE" not in os.environ and world_size > 1:
        if "LOCAL_SIZE" in os.environ:  # the deepspeed launcher
            local, source = os.environ["LOCAL_SIZE"], "LOCAL_SIZE (deepspeed launcher)"
        else:
            local, source = str(world_size), "WORLD_SIZE, assuming a single node"
        os.environ["LOCAL_WORLD_SIZE"] = local
        log.warning("LOCAL_WORLD_SIZE is not set; using %s from %s", local, source)
    info = RankInfo(_env_int("RANK", 0), world_size, _env_int("LOCAL_WORLD_SIZE", 1))
    if not (
        0 <= info.rank < info.world_size
        and info.local_world_size >= 1
        and info.world_size % info.local_world_size == 0
    ):
        raise DatasetError(
            f"inconsistent distributed environment RANK={info.rank} WORLD_SIZE={info.world_size} "
            f"LOCAL_WORLD_SIZE={info.local_world_size}: need 0 <= RANK < WORLD_SIZE and "
            f"WORLD_SIZE a multiple of LOCAL_WORLD_SIZE"
        )
    return info


def init_process_group(info: RankInfo) -> bool:
    """Initialise torch.distributed (gloo) when several ranks run and nobody has; True if we did."""
    if info.world_size == 1 or dist.is_initialized():
        return False
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise DatasetError(
            f"WORLD_SIZE={info.world_size} but {' and '.join(missing)} not set: start the ranks "
            f"with a launcher (torchrun, deepspeed, srun via training.distributed)"
        )
    dist.init_process_group("gloo", rank=info.rank, world_size=info.world_size)
    return True


def gather(value: object, info: RankInfo) -> list[object]:
    """`value` from every rank (in rank order); needs an initialised process group if several."""
    if info.world_size == 1:
        return [value]
    values: list[object] = [None] * info.world_size
    dist.all_gather_object(values, value)
    return values
