"""Run by test_zero_init under torchrun: build models the way launch.train does (zero.Init on
several ranks), report how far each rank's peak resident memory during the construction rises
above its resident memory before (imports, allocator) and the sha256 of every gathered weight
and buffer, as JSON, for comparison with a full construction."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import deepspeed
import torch

from training.config import load_config
from training.distributed import exit_process, init_world
from training.engine import build_model, zero_init


def digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().contiguous().view(torch.uint8).numpy()).hexdigest()


def status_bytes(field: str) -> int:
    """A size from /proc/self/status: VmRSS (resident now) or VmHWM (its high-water mark
    since the last `reset_peak_rss`)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def hashes(model: torch.nn.Module, main: bool) -> dict[str, str]:
    """sha256 of every parameter (gathered one at a time; hashed on the main rank) and buffer,
    by name. Collective."""
    found = {}
    for name, param in model.named_parameters():
        with deepspeed.zero.GatheredParameters([param]):
            if main:
                found[name] = digest(param.data)
    for name, buffer in model.named_buffers():
        found[name] = f"{buffer.dtype}:{digest(buffer)}"
    return found


def main(out: str, *configs: str) -> None:
    """configs: "CONFIG.yaml key=value,key=value" specs, built in turn."""
    world = init_world()
    report = []
    for spec in configs:
        path, _, overrides = spec.partition(" ")
        cfg = load_config(path, [o for o in overrides.split(",") if o])
        assert zero_init(cfg, world.world_size)
        torch.distributed.barrier()
        reset_peak_rss()
        before = status_bytes("VmRSS")  # the imports' and the allocator's, not the model's
        model = build_model(cfg, world.world_size, world.device)
        peaks: list = [None] * world.world_size
        torch.distributed.all_gather_object(peaks, status_bytes("VmHWM") - before)
        report.append({"config": spec, "rss_growth": peaks, "hashes": hashes(model, world.is_main)})
        del model
    if world.is_main:
        Path(out).write_text(json.dumps(report))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
    exit_process(0)
