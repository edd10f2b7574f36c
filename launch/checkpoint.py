"""Checkpoints of a run: `RUN/checkpoints/step_<N>/`, saved collectively, resumed exactly.

A checkpoint is DeepSpeed's files (ZeRO partitions of weights and optimizer state, the LR
schedule), one `trainer_rank_<r>.pt` per rank (its data-loader position and RNG states), and
last a manifest `rotalibi.json` written by rank 0 once every rank has finished: step, tokens
seen, world size, the resolved config, and the size of every file. Only a checkpoint whose
manifest exists and whose files all have their recorded sizes is ever resumed from, so one
killed mid-save, or truncated afterwards, is skipped with a warning. `latest` names the newest
complete one.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("rotalibi")

MANIFEST = "rotalibi.json"


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int
    manifest: dict


def tag(step: int) -> str:
    return f"step_{step}"


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def restore_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state_all(state["cuda"])


def _file_sizes(directory: Path) -> dict[str, int]:
    return {
        str(p.relative_to(directory)): p.stat().st_size
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def _problem(directory: Path) -> str | None:
    """Why `directory` is not a complete checkpoint, or None if it is."""
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        return "no manifest: the save did not finish"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        return f"unreadable manifest ({e})"
    present = _file_sizes(directory)
    for name, size in manifest["files"].items():
        if name not in present:
            return f"{name} is missing"
        if present[name] != size:
            return f"{name} has {present[name]} bytes, {size} when saved"
    return None


def find_checkpoints(checkpoint_dir: Path, *, warn: bool = True) -> list[Checkpoint]:
    """Complete checkpoints, oldest first; incomplete ones are skipped (with a warning)."""
    found = []
    candidates = checkpoint_dir.glob("step_*") if checkpoint_dir.is_dir() else []
    for directory in candidates:
        if not directory.is_dir() or not directory.name[5:].isdigit():
            continue
        problem = _problem(directory)
        if problem is not None:
            if warn:
                log.warning("skipping checkpoint %s: %s", directory, problem)
            continue
        manifest = json.loads((directory / MANIFEST).read_text())
        found.append(Checkpoint(directory, manifest["step"], manifest))
    return sorted(found, key=lambda c: c.step)


def save(engine, checkpoint_dir: Path, *, step: int, manifest: dict, rank_state: dict) -> Path:
    """Save collectively (every rank calls this); returns the checkpoint's directory."""
    world = torch.distributed
    directory = checkpoint_dir / tag(step)
    if world.get_rank() == 0 and directory.exists():
        shutil.rmtree(directory)  # an earlier, incomplete save of the same step
    world.barrier()
    engine.save_checkpoint(str(checkpoint_dir), tag=tag(step), save_latest=False)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(rank_state, directory / f"trainer_rank_{world.get_rank()}.pt")
    world.barrier()
    if world.get_rank() == 0:
        manifest = {**manifest, "step": step, "files": _file_sizes(directory)}
        write_atomically(directory / MANIFEST, json.dumps(manifest, indent=1))
        write_atomically(checkpoint_dir / "latest", tag(step))
    world.barrier()
    return directory


def prune(checkpoint_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints (rank 0 only)."""
    for old in find_checkpoints(checkpoint_dir, warn=False)[:-keep]:
        shutil.rmtree(old.path)


def load(engine, checkpoint: Checkpoint) -> dict:
    """Restore DeepSpeed's state and return this rank's trainer state (loader, RNG)."""
    load_path, _ = engine.load_checkpoint(
        str(checkpoint.path.parent), tag=checkpoint.path.name, load_module_strict=True
    )
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load {checkpoint.path}")
    rank = torch.distributed.get_rank()
    return torch.load(checkpoint.path / f"trainer_rank_{rank}.pt", weights_only=False)


def write_atomically(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file: readers see the old or the new."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
