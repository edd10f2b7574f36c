"""Checkpoints of a run: `RUN/checkpoints/step_<N>/`, saved collectively, resumed exactly.

A checkpoint is DeepSpeed's files (ZeRO partitions of weights and optimizer state, the LR
schedule), one `trainer_rank_<r>.pt` per rank (its data-loader position and RNG states, as
tensors and plain values: loaded with `weights_only=True`, never unpickled), and last a
manifest `rotalibi.json` written by rank 0 once every rank has finished: step, tokens seen,
world size, the resolved config, whether every weight is finite, and the size and sha256 of
every file (the ranks hash a share each). A checkpoint is incomplete (killed mid-save,
truncated, altered) and skipped with a warning when its manifest is missing, malformed (every
key of `MANIFEST_KEYS` of its type, a config that parses, another step than its directory's) or
lists less than its layout needs (each rank's trainer state, DeepSpeed's model and optimizer
states: `missing_layout`), when a listed file is missing or has another size, or when the
directory holds a file the manifest does not list (DeepSpeed loads files by name, and
zero_to_fp32 by pattern: an unlisted one would be loaded unverified). `verify` also compares
the content hashes, before a checkpoint is resumed, evaluated or exported. `latest` names the
newest complete one.

A checkpoint directory may be a symbolic link (moved to another disk): `prune` removes the
link, and its target too when that is this run's checkpoint of the same step (`prune`).

Resuming on another number of ranks needs DeepSpeed's universal checkpoint (each parameter's
weights and Adam moments whole, loadable by any number of ranks): `to_universal` converts a
checkpoint once into `step_<N>/universal/`, with a manifest of its own, verified alike.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

log = logging.getLogger("rotalibi")

MANIFEST = "rotalibi.json"
UNIVERSAL = "universal"
UNIVERSAL_PARTIAL = UNIVERSAL + ".partial"  # a conversion under way (or killed)
# ds_to_universal's pointer to its output, written beside it: part of the conversion.
UNIVERSAL_POINTER = "latest_universal"

# Every key of a checkpoint's manifest and its type (bool is not taken for int).
MANIFEST_KEYS = {
    "step": int,
    "finite": bool,
    "files": dict,
    "config": str,
    "tokens": int,
    "skipped_steps": int,
    "hooks_owed": bool,
    "world_size": int,
    "tokenizer_sha256": str,
}
OPTIONAL_MANIFEST_KEYS = {"sequence_parallel": int}  # absent in older manifests: 1
# The values of the saved config that resuming, exporting and evaluating read.
CONFIG_KEYS = {
    ("model",): dict,
    ("data", "path"): str,
    ("data", "seq_len"): int,
    ("data", "batch_size"): int,
    ("train", "grad_accum"): int,
    ("deepspeed", "zero_stage"): int,
}


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
    """The files of a checkpoint, its universal conversion (which has a manifest of its own,
    or is still being written, and DeepSpeed's pointer to it) left out."""
    conversion = (UNIVERSAL, UNIVERSAL_PARTIAL, UNIVERSAL_POINTER)
    return [
        str(p.relative_to(directory))
        for p in sorted(directory.rglob("*"))
        if p.is_file()
        and p.name != MANIFEST
        and p.relative_to(directory).parts[0] not in conversion
    ]


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _typed(value: object, kind: type) -> bool:
    return type(value) is int if kind is int else isinstance(value, kind)


def _manifest_shape_problem(manifest: object) -> str | None:
    """Why a parsed manifest (of a checkpoint or of a universal conversion) is not one of ours:
    valid JSON of the wrong shape."""
    if not isinstance(manifest, dict) or not _typed(manifest.get("step"), int):
        return "malformed manifest (no step)"
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(
        isinstance(entry, dict)
        and _typed(entry.get("bytes"), int)
        and isinstance(entry.get("sha256"), str)
        for entry in files.values()
    ):
        return "malformed manifest (files without their bytes and sha256)"
    return None


# The files of a checkpoint's layout, by rank: rotalibi's trainer state, DeepSpeed's model states
# (one per rank under ZeRO-3, else one of rank 0's) and ZeRO's optimizer partitions (over every
# rank, sequence-parallel ones too; bf16_ when trained in bfloat16).
_TRAINER = re.compile(r"trainer_rank_(\d+)\.pt")
_MODEL_PARTITION = re.compile(r"zero_pp_rank_(\d+)_mp_rank_\d+_model_states\.pt")
_MODEL = re.compile(r"mp_rank_\d+_model_states\.pt")
_OPTIMIZER = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt")


def missing_layout(manifest: dict) -> list[str]:
    """The files a checkpoint needs that its (well-formed) manifest does not list: each rank's
    trainer state and optimizer partition, and DeepSpeed's model states (each rank's under
    ZeRO-3). At most 3 are named."""
    config = yaml.safe_load(manifest["config"])
    world_size = manifest["world_size"]
    found: dict[re.Pattern, set[int]] = {
        _TRAINER: set(),
        _MODEL_PARTITION: set(),
        _OPTIMIZER: set(),
    }
    whole_model = False
    for name in manifest["files"]:
        whole_model = whole_model or _MODEL.fullmatch(name) is not None
        for pattern, ranks in found.items():
            if match := pattern.fullmatch(name):
                ranks.add(int(match[1]))
    expected = [
        (_TRAINER, "trainer_rank_{}.pt"),
        (_OPTIMIZER, "zero_pp_rank_{}_mp_rank_00_optim_states.pt"),
    ]
    missing = []
    if config["deepspeed"]["zero_stage"] == 3:
        expected.insert(1, (_MODEL_PARTITION, "zero_pp_rank_{}_mp_rank_00_model_states.pt"))
    elif not whole_model:
        missing.append("mp_rank_00_model_states.pt")
    for pattern, name in expected:
        ranks = found[pattern]
        absent = (name.format(r) for r in range(world_size) if r not in ranks)
        missing += itertools.islice(absent, 3)
    return missing[:3]


def manifest_problem(manifest: object, directory: Path | None = None) -> str | None:
    """Why a parsed manifest is not a checkpoint's (every key of MANIFEST_KEYS of its type, a
    config that parses and holds CONFIG_KEYS, the step of its directory `step_<N>`, the files
    of its layout), or None."""
    if (problem := _manifest_shape_problem(manifest)) is not None:
        return problem
    for key, kind in {**MANIFEST_KEYS, **OPTIONAL_MANIFEST_KEYS}.items():
        if key not in manifest:
            if key in OPTIONAL_MANIFEST_KEYS:
                continue
            return f"malformed manifest (no {key!r})"
        if not _typed(manifest[key], kind):
            return f"malformed manifest ({key!r} is not {kind.__name__})"
    if manifest["step"] < 0 or manifest["tokens"] < 0 or manifest["skipped_steps"] < 0:
        return "malformed manifest (a negative step or count)"
    sequence_parallel = manifest.get("sequence_parallel", 1)
    if manifest["world_size"] < 1 or sequence_parallel < 1:
        return "malformed manifest (world_size or sequence_parallel below 1)"
    if manifest["world_size"] % sequence_parallel:
        return "malformed manifest (sequence_parallel does not divide world_size)"
    if directory is not None and directory.name != tag(manifest["step"]):
        return f"malformed manifest (of step {manifest['step']}, in {directory.name})"
    try:
        config = yaml.safe_load(manifest["config"])
    except yaml.YAMLError as e:
        return f"malformed manifest (its config is not YAML: {str(e).splitlines()[0]})"
    for keys, kind in CONFIG_KEYS.items():
        value = config
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        if not _typed(value, kind):
            return (
                f"malformed manifest (its config has no {'.'.join(keys)} of type {kind.__name__})"
            )
    if missing := missing_layout(manifest):
        return f"malformed manifest (it does not list {', '.join(missing)})"
    return None


def _complete_manifest(
    directory: Path, *, universal: bool = False
) -> tuple[dict | None, str | None]:
    """(the manifest, None) of a complete checkpoint (by its files' sizes), or (None, why not).
    `universal`: a universal conversion, whose manifest holds only its step and files."""
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        return None, "no manifest: the save did not finish"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"unreadable manifest ({e})"
    if universal:
        problem = _manifest_shape_problem(manifest)
    else:
        problem = manifest_problem(manifest, directory)
    if problem is not None:
        return None, problem
    for name, entry in manifest["files"].items():
        path = directory / name
        if not path.is_file():
            return None, f"{name} is missing"
        if (size := path.stat().st_size) != entry["bytes"]:
            return None, f"{name} has {size} bytes, {entry['bytes']} when saved"
    try:
        unlisted = [name for name in _files(directory) if name not in manifest["files"]]
    except OSError as e:
        return None, f"cannot list its files ({e})"
    if unlisted:
        return None, f"{unlisted[0]} is not in the manifest (it was not saved with it)"
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


def non_finite_problem(checkpoint: Checkpoint) -> str | None:
    """Why `checkpoint` cannot be used as a model (its manifest records non-finite weights),
    naming the newest checkpoint of its run with finite weights; None when it is finite."""
    if checkpoint.manifest["finite"]:
        return None
    good = last_good(checkpoint.path.parent)
    instead = (
        f"the newest with finite weights is {good.path.name}: pass --step {good.step}"
        if good is not None
        else "no checkpoint of this run has finite weights"
    )
    return (
        f"checkpoint {checkpoint.path} has non-finite weights (saved after training diverged); "
        f"{instead}"
    )


def unverified(checkpoint_dir: Path, known: dict[Path, str]) -> dict[Path, str]:
    """Every checkpoint directory `step_<N>` of `checkpoint_dir` holding a manifest, oldest
    first, with why it cannot be resumed: `known[path]` when given, else why it is incomplete.
    A directory without a manifest is a save that never finished, not a checkpoint: left out."""
    found = {}
    candidates = checkpoint_dir.glob("step_*") if checkpoint_dir.is_dir() else []
    for directory in candidates:
        if not directory.name[5:].isdigit() or not (directory / MANIFEST).is_file():
            continue
        why = known.get(directory) or _complete_manifest(directory)[1] or "not verified"
        found[directory] = why
    return dict(sorted(found.items(), key=lambda item: int(item[0].name[5:])))


def free_path(destination: Path, name: str) -> Path:
    """`destination/name`, or `name.1`, `name.2`, ... when taken."""
    target, n = destination / name, 0
    while target.exists() or target.is_symlink():
        n += 1
        target = destination / f"{name}.{n}"
    return target


def move_aside(directories: list[Path], destination: Path) -> list[Path]:
    """Move checkpoint directories (or links to them) into `destination`, keeping their names
    (`step_12`, or `step_12.1` when taken); returns where each went."""
    destination.mkdir(parents=True, exist_ok=True)
    moved = []
    for directory in directories:
        target = free_path(destination, directory.name)
        shutil.move(str(directory), str(target))
        moved.append(target)
    return moved


def save(engine, checkpoint_dir: Path, *, step: int, manifest: dict, rank_state: dict) -> Path:
    """Save collectively (every rank calls this); returns the checkpoint's directory.
    CheckpointError on every rank when any rank could not write its files (disk full)."""
    world = torch.distributed
    rank, world_size = world.get_rank(), world.get_world_size()
    directory = checkpoint_dir / tag(step)
    if rank == 0 and (directory.exists() or directory.is_symlink()):
        _remove_directory(directory)  # an earlier, incomplete save of the same step
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


def _remove_directory(path: Path) -> None:
    """Remove a directory, or only the link when it is a symbolic link to one."""
    if path.is_symlink():
        path.unlink()
    else:
        shutil.rmtree(path)


def _own_checkpoint(target: Path, link: Path) -> bool:
    """Whether `target`, where the checkpoint link `link` points, is this run's checkpoint of
    the same step: a complete one named as the link, whose config names this run's directory
    (run.name), and neither the checkpoint directory nor one holding it."""
    checkpoint_dir = link.parent.resolve()
    if target.name != link.name or target.is_symlink() or not target.is_dir():
        return False
    if target == checkpoint_dir or target in checkpoint_dir.parents:
        return False
    manifest, problem = _complete_manifest(target)
    if problem is not None:
        return False
    run = yaml.safe_load(manifest["config"]).get("run")
    return isinstance(run, dict) and run.get("name") == checkpoint_dir.parent.name


def prune(checkpoint_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints (rank 0 only). A checkpoint that
    is a symbolic link (moved to another disk) loses the link, and its target too when that is
    this run's checkpoint of the same step (`_own_checkpoint`); any other target is left, with
    a warning. A removal that fails is a warning: training goes on."""
    for old in find_checkpoints(checkpoint_dir, warn=False)[:-keep]:
        try:
            if not old.path.is_symlink():
                shutil.rmtree(old.path)
                continue
            target = old.path.resolve()
            own = _own_checkpoint(target, old.path)
            old.path.unlink()
            if own:
                shutil.rmtree(target)
            else:
                log.warning(
                    "pruned the link %s; its target %s is not this run's %s: left in place",
                    old.path,
                    target,
                    old.path.name,
                )
        except OSError as e:
            log.warning("cannot prune checkpoint %s: %s", old.path, e)


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
    partial = target.with_name(UNIVERSAL_PARTIAL)
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
            manifest, problem = _complete_manifest(target, universal=True)
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
        manifest, shared[0] = _complete_manifest(target, universal=True)
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
