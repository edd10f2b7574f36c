"""Checkpoints of a run: `RUN/checkpoints/step_<N>/`, saved collectively, resumed exactly.

A checkpoint is DeepSpeed's files (ZeRO partitions of weights and optimizer state, the LR
schedule), one `trainer_rank_<r>.pt` per rank (its data-loader position and RNG states, as
tensors and plain values: loaded with `weights_only=True`, never unpickled), and last a
manifest `rotalibi.json` written by rank 0 once every rank has finished: step, tokens seen,
world size, the resolved config, whether every weight is finite, and the size and sha256 of
every file (the ranks hash a share each). A checkpoint whose manifest is missing or malformed,
or one of whose files is missing or has another size, is incomplete (killed mid-save, truncated)
and skipped with a warning; `verify` also compares the content hashes, before a checkpoint is
resumed, evaluated or exported. `latest` names the newest complete one.

Resuming on another number of ranks needs DeepSpeed's universal checkpoint (each parameter's
weights and Adam moments whole, loadable by any number of ranks): `to_universal` converts a
checkpoint once into `step_<N>/universal/`, with a manifest of its own, verified alike.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("rotalibi")

MANIFEST = "rotalibi.json"
UNIVERSAL = "universal"


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int
    manifest: dict


def tag(step: int) -> str:
    return f"step_{step}"


class CheckpointError(RuntimeError):
    """A checkpoint could not be saved (disk full, not writable): one line, with the path."""


def rng_state() -> dict:
    """Every RNG's state as tensors and plain values (loadable with weights_only=True)."""
    version, internal, gauss = random.getstate()
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached_gaussian],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def restore_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    keys, pos, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state(
        ("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, cached_gaussian)
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state_all(state["cuda"])


def _files(directory: Path) -> list[str]:
    """The files of a checkpoint, its universal conversion (which has a manifest of its own)
    left out."""
    return [
        str(p.relative_to(directory))
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST and p.relative_to(directory).parts[0] != UNIVERSAL
    ]


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _manifest_shape_problem(manifest: object) -> str | None:
    """Why a parsed manifest is not one of ours (valid JSON of the wrong shape)."""
    if not isinstance(manifest, dict) or not isinstance(manifest.get("step"), int):
        return "malformed manifest (no step)"
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(
        isinstance(entry, dict)
        and isinstance(entry.get("bytes"), int)
        and isinstance(entry.get("sha256"), str)
        for entry in files.values()
    ):
        return "malformed manifest (files without their bytes and sha256)"
    return None


def _complete_manifest(directory: Path) -> tuple[dict | None, str | None]:
    """(the manifest, None) of a complete checkpoint (by its files' sizes), or (None, why not)."""
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        return None, "no manifest: the save did not finish"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"unreadable manifest ({e})"
    if (problem := _manifest_shape_problem(manifest)) is not None:
        return None, problem
    for name, entry in manifest["files"].items():
        path = directory / name
        if not path.is_file():
            return None, f"{name} is missing"
        if (size := path.stat().st_size) != entry["bytes"]:
            return None, f"{name} has {size} bytes, {entry['bytes']} when saved"
    return manifest, None


def verify(checkpoint: Checkpoint, rank: int = 0, world_size: int = 1) -> str | None:
    """Why the content of `checkpoint` is not what was saved (a file whose sha256 differs), or
    None; a rank of `world_size` checks every world_size-th file."""
    names = sorted(checkpoint.manifest["files"])[rank::world_size]
    for name in names:
        if sha256(checkpoint.path / name) != checkpoint.manifest["files"][name]["sha256"]:
            return f"{name} is not the file that was saved (its sha256 differs)"
    return None


def find_checkpoints(checkpoint_dir: Path, *, warn: bool = True) -> list[Checkpoint]:
    """Complete checkpoints, oldest first; incomplete ones are skipped (with a warning)."""
    found = []
    candidates = checkpoint_dir.glob("step_*") if checkpoint_dir.is_dir() else []
    for directory in candidates:
        if not directory.is_dir() or not directory.name[5:].isdigit():
            continue
        manifest, problem = _complete_manifest(directory)
        if problem is not None:
            if warn:
                log.warning("skipping checkpoint %s: %s", directory, problem)
            continue
        found.append(Checkpoint(directory, manifest["step"], manifest))
    return sorted(found, key=lambda c: c.step)


def free_space(path: Path) -> str:
    """The free space of the file system holding `path` (or its nearest existing parent)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return f"{shutil.disk_usage(path).free / 2**20:,.0f} MiB free"
    except OSError:
        return "free space unknown"


def weights_finite(engine) -> bool:
    """Whether every weight this rank holds is finite (its ZeRO-3 partition, or the whole)."""
    return all(
        bool(torch.isfinite(getattr(p, "ds_tensor", p)).all()) for p in engine.module.parameters()
    )


def _all_ranks(ok: bool, device: torch.device) -> bool:
    flag = torch.tensor([float(ok)], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item())


def _failure(rank: int, error: Exception, directory: Path) -> str:
    """What went wrong on this rank, with the free space at that moment (a full disk shows)."""
    what = getattr(error, "strerror", None) or str(error).splitlines()[0]
    return f"rank {rank}: {what}; {free_space(directory)}"


def _unless_every_rank_saved(failure: str | None, directory: Path, device: torch.device) -> None:
    """Collective: when any rank failed to write, rank 0 removes the partial save (its space is
    what the logs need now) and every rank raises CheckpointError."""
    if _all_ranks(failure is None, device):
        return
    if torch.distributed.get_rank() == 0:
        shutil.rmtree(directory, ignore_errors=True)
    raise CheckpointError(
        f"cannot save checkpoint {directory} ({failure or 'another rank failed'}): the partial "
        "save is removed; the run stops at its last complete checkpoint"
    )


def last_good(checkpoint_dir: Path) -> Checkpoint | None:
    """The newest complete checkpoint whose weights are all finite."""
    found = [c for c in find_checkpoints(checkpoint_dir, warn=False) if c.manifest["finite"]]
    return found[-1] if found else None


def save(engine, checkpoint_dir: Path, *, step: int, manifest: dict, rank_state: dict) -> Path:
    """Save collectively (every rank calls this); returns the checkpoint's directory.
    CheckpointError on every rank when any rank could not write its files (disk full)."""
    world = torch.distributed
    rank, world_size = world.get_rank(), world.get_world_size()
    directory = checkpoint_dir / tag(step)
    if rank == 0 and directory.exists():
        shutil.rmtree(directory)  # an earlier, incomplete save of the same step
    world.barrier()
    failure = None
    try:
        engine.save_checkpoint(str(checkpoint_dir), tag=tag(step), save_latest=False)
        directory.mkdir(parents=True, exist_ok=True)
        torch.save(rank_state, directory / f"trainer_rank_{rank}.pt")
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as RuntimeError
        failure = _failure(rank, e, directory)
    _unless_every_rank_saved(failure, directory, engine.device)
    finite = _all_ranks(weights_finite(engine), engine.device)
    names = _files(directory)[rank::world_size]  # every file is written: hash a share each
    shares: list = [None] * world_size
    world.all_gather_object(shares, {name: sha256(directory / name) for name in names})
    if rank == 0:
        hashes = {name: digest for share in shares for name, digest in share.items()}
        files = {
            name: {"bytes": (directory / name).stat().st_size, "sha256": hashes[name]}
            for name in sorted(hashes)
        }
        manifest = {**manifest, "step": step, "finite": finite, "files": files}
        try:
            write_atomically(directory / MANIFEST, json.dumps(manifest, indent=1))
            write_atomically(checkpoint_dir / "latest", tag(step))
        except OSError as e:
            failure = _failure(rank, e, directory)
    _unless_every_rank_saved(failure, directory, engine.device)
    return directory


def prune(checkpoint_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints (rank 0 only)."""
    for old in find_checkpoints(checkpoint_dir, warn=False)[:-keep]:
        shutil.rmtree(old.path)


def load(engine, checkpoint: Checkpoint) -> None:
    """Restore DeepSpeed's state (weights, optimizer, LR schedule) saved by as many ranks."""
    _deepspeed_load(engine, checkpoint.path)


def load_universal(engine, checkpoint: Checkpoint) -> None:
    """Restore DeepSpeed's state saved by any number of ranks through its universal form (the
    engine built with `load_universal`). Collective."""
    _deepspeed_load(engine, to_universal(checkpoint))


def _deepspeed_load(engine, path: Path) -> None:
    load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_module_strict=True)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load {path}")


def trainer_state(checkpoint: Checkpoint, rank: int) -> dict:
    """Rank `rank`'s trainer state (loader position, RNG) in `checkpoint`."""
    return torch.load(checkpoint.path / f"trainer_rank_{rank}.pt", weights_only=True)


def _manifest_of(directory: Path, step: int) -> dict:
    files = {
        name: {"bytes": (directory / name).stat().st_size, "sha256": sha256(directory / name)}
        for name in _files(directory)
    }
    return {"step": step, "files": files}


def _convert_to_universal(checkpoint: Checkpoint, target: Path) -> None:
    """DeepSpeed's ds_to_universal (a child process: its worker pools and memory end with it)
    into `target`, written last with its manifest: a half-done conversion is never used."""
    partial = target.with_name(UNIVERSAL + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(target, ignore_errors=True)
    workers = str(max(1, min(8, os.cpu_count() or 1)))
    command = [
        sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
        "--input_folder", str(checkpoint.path), "--output_folder", str(partial),
        "--num_extract_workers", workers, "--num_merge_workers", workers,
    ]  # fmt: skip
    log.info("converting %s to DeepSpeed's universal checkpoint", checkpoint.path)
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        shutil.rmtree(partial, ignore_errors=True)
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise CheckpointError(
            f"cannot convert {checkpoint.path} to a universal checkpoint: {last}; "
            f"{free_space(checkpoint.path)}"
        )
    write_atomically(partial / MANIFEST, json.dumps(_manifest_of(partial, checkpoint.step)))
    os.replace(partial, target)


def to_universal(checkpoint: Checkpoint) -> Path:
    """`checkpoint`'s universal form, `<checkpoint>/universal/`: converted by rank 0 unless a
    complete conversion is there, then verified by every rank (a share of the files each).
    Collective; CheckpointError on every rank when it could not be made."""
    world = torch.distributed
    rank, world_size = world.get_rank(), world.get_world_size()
    target = checkpoint.path / UNIVERSAL
    problem = None
    if rank == 0:
        try:
            manifest, problem = _complete_manifest(target)
            if problem is None:
                problem = verify(Checkpoint(target, checkpoint.step, manifest))
            if problem is not None:
                _convert_to_universal(checkpoint, target)
            problem = None
        except (OSError, CheckpointError) as e:
            problem = str(e)
    shared = [problem]
    world.broadcast_object_list(shared, src=0)
    if shared[0] is None:
        manifest, shared[0] = _complete_manifest(target)
        if shared[0] is None:
            shared[0] = verify(Checkpoint(target, checkpoint.step, manifest), rank, world_size)
    problems: list = [None] * world_size
    world.all_gather_object(problems, shared[0])
    if (problem := next((p for p in problems if p is not None), None)) is not None:
        raise CheckpointError(f"universal checkpoint of {checkpoint.path}: {problem}")
    return target


def write_atomically(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file: readers see the old or the new."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
