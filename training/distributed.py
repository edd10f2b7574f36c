"""Process-group set-up for every launcher: one process, torchrun, the deepspeed launcher, srun.

torch.distributed reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; mosaicml
streaming also needs LOCAL_WORLD_SIZE. torchrun sets them all, the deepspeed launcher all but
LOCAL_WORLD_SIZE (it calls it LOCAL_SIZE), srun none: `environment_from_slurm` maps SLURM's own
variables (no mpi4py), and a lone process gets a single-rank world on a free local port.
"""

from __future__ import annotations

import atexit
import os
import re
import socket
import sys
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, NoReturn

import torch

if TYPE_CHECKING:
    from model.sequence_parallel import SequenceParallel


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list ("gpu[01-03,07],login1") as host names, in order."""
    hosts = []
    for name, ranges in re.findall(r"([^,\[]+)(?:\[([^\]]*)\])?,?", nodelist):
        if not ranges:
            hosts.append(name)
            continue
        for part in ranges.split(","):
            first, _, last = part.partition("-")
            width = len(first)
            for i in range(int(first), int(last or first) + 1):
                hosts.append(f"{name}{i:0{width}d}")
    return hosts


def _tasks_on_this_node(env: MutableMapping[str, str]) -> int:
    """SLURM_TASKS_PER_NODE looks like "4(x2),3": the count of the node this task runs on."""
    counts = []
    for item in env["SLURM_TASKS_PER_NODE"].split(","):
        count, _, repeat = item.partition("(x")
        counts += [int(count)] * int(repeat.rstrip(")") or 1)
    return counts[int(env.get("SLURM_NODEID", 0))]


def environment_from_slurm(env: MutableMapping[str, str]) -> None:
    """Fill the torch.distributed variables from a SLURM task's, leaving any already set."""
    mapping = {
        "RANK": env["SLURM_PROCID"],
        "LOCAL_RANK": env["SLURM_LOCALID"],
        "WORLD_SIZE": env["SLURM_NTASKS"],
        "LOCAL_WORLD_SIZE": str(_tasks_on_this_node(env)),
        "MASTER_ADDR": expand_nodelist(env["SLURM_JOB_NODELIST"])[0],
        # A port per job, so two jobs sharing a node never collide.
        "MASTER_PORT": str(20000 + int(env["SLURM_JOB_ID"]) % 20000),
    }
    for key, value in mapping.items():
        env.setdefault(key, value)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def complete_environment(env: MutableMapping[str, str] | None = None) -> None:
    """Make RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR/PORT all present."""
    env = os.environ if env is None else env
    if "RANK" not in env and "SLURM_PROCID" in env and "SLURM_JOB_NODELIST" in env:
        environment_from_slurm(env)
    if "RANK" not in env:  # a lone process
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        env.setdefault("MASTER_PORT", str(_free_port()))
    env.setdefault("LOCAL_RANK", "0")
    # The deepspeed launcher names it LOCAL_SIZE; a one-node world has every rank local.
    env.setdefault("LOCAL_WORLD_SIZE", env.get("LOCAL_SIZE", env["WORLD_SIZE"]))


@dataclass(frozen=True)
class World:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_world() -> World:
    """Complete the environment and start the process group (nccl on CUDA, gloo on the CPU)."""
    import deepspeed

    complete_environment()
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    deepspeed.init_distributed(
        dist_backend="nccl" if device.type == "cuda" else "gloo", verbose=False
    )
    return World(
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        local_rank=local_rank,
        device=device,
    )


def sequence_parallel_group(world: World, size: int) -> SequenceParallel | None:
    """Collective: the job's ranks in consecutive groups of `size` that share one sequence
    (rank r holds slice r % size); this rank's group, or None when size is 1."""
    if size == 1:
        return None
    from model.sequence_parallel import SequenceParallel

    mine = None
    for first in range(0, world.world_size, size):
        group = torch.distributed.new_group(list(range(first, first + size)))
        if first <= world.rank < first + size:
            mine = group
    return SequenceParallel(mine, size, world.rank % size)


def mean_over_ranks(values: list[float], device: torch.device) -> list[float]:
    """Element-wise mean over ranks (a collective)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(tensor)
    return (tensor / torch.distributed.get_world_size()).tolist()


@contextmanager
def single_threaded_comm_start(device: torch.device) -> Iterator[None]:
    """On the CPU: run the block (the engine's set-up) with one intra-op thread, then give every
    gloo worker thread some work, then let this rank use its share of the cores. On CUDA: only
    the block. Collective: every rank enters it.

    torch's gloo worker threads take the intra-op thread count in force when they first
    compute. With more than one, their OpenMP teams oversubscribe the cores, libgomp stops
    spinning, and every op of a training step runs about 2x slower. Several concurrent
    collectives per group, of tensors big enough to be copied in parallel, reach each thread.
    """
    if device.type != "cpu":
        yield
        return
    torch.set_num_threads(1)
    yield
    from torch.distributed import distributed_c10d as c10d

    for group in list(c10d._world.pg_map):
        if torch.distributed.get_backend(group) != "gloo":
            continue
        works = []
        for _ in range(8):
            chunk = torch.zeros(1 << 17)
            gathered = torch.empty(torch.distributed.get_world_size(group) * chunk.numel())
            works.append(torch.distributed.all_gather_into_tensor(gathered, chunk, group, True))
            works.append(torch.distributed.all_reduce(chunk, group=group, async_op=True))
        for work in works:
            work.wait()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["LOCAL_WORLD_SIZE"])))


def exit_process(code: int) -> NoReturn:
    """End a distributed process with `code`: the exit handlers run (logging, streaming's shared
    memory, temporary directories), the interpreter's teardown does not. DeepSpeed keeps the
    model, and with it its gloo process groups, alive to the end; destroyed in the teardown,
    gloo's threads sometimes abort the process after its work is done ("terminate called
    without an active exception", exit -6: about 1 run in 10 on 2 CPU ranks)."""
    atexit._run_exitfuncs()  # what the interpreter's exit would run first
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
