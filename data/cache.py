"""The local shard cache: where streaming copies and decompresses shards for training.

Two traps live here. A cache directory reused for another dataset would serve that dataset's
shards (streaming trusts a local index.json), so the directory is named by a key of the streams
(their location and dataset fingerprint). A job that crashed leaves streaming's shared memory
registered for its cache directory, and the next job on it fails with "Reused local
directory". So each node's local rank 0 claims a slot of the key's directory with an exclusive
lock held while the loader lives (a concurrent job on the same node takes the next slot), and
unlinks shared memory that still names the slot: with the lock held, its owner is dead. This is
the streaming FAQ's clean-up, limited to our own slot: `streaming.base.util.
clean_stale_shared_memory()` would also unlink the live shared memory of other jobs.

On a shared node nothing in a world-writable place is trusted. The default cache lives in a
private directory, `<tmp>/rotalibi-<uid>` (mode 0700, owned by us, not a link), as does the
set-up lock. A path planted there (another user's directory, a file, a link) is refused with a
warning and the first of `<tmp>/rotalibi-<uid>-1`, `-2`, ... that is (or can be made) private
to us is used instead: the same one on every run, so the lock and cache stay shared between
jobs and nothing new is left behind per run. A data.cache_dir must belong to us and be writable
by us alone. Streaming trusts whatever index.json and shard files a cache
directory holds, so before use every cached file is checked against the source's index (its
bytes, and each shard's xxh64): anything else is evicted. Other users' shared memory is skipped.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing.shared_memory import SharedMemory as BuiltinSharedMemory
from pathlib import Path
from typing import IO

import numpy as np
from streaming.base.constant import BARRIER_FILELOCK, CACHE_FILELOCK, LOCALS, SHM_TO_CLEAN
from streaming.base.hashing import get_hash
from streaming.base.shared import SharedMemory
from streaming.base.shared.prefix import _get_path

from data.manifest import DatasetError

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
INDEX = "index.json"
HASH = "xxh64"  # what data.prepare writes for every shard file


FALLBACKS = 32  # <tmp>/rotalibi-<uid>-1 ... -32 when <tmp>/rotalibi-<uid> is not ours
_warned: set[str] = set()


def _private_problem(directory: Path, *, strict_mode: bool) -> str | None:
    """Why `directory` is not a private directory of ours (None if it is)."""
    try:
        info = os.lstat(directory)
    except OSError as e:
        return f"it cannot be looked at ({e.strerror or e})"
    if not stat.S_ISDIR(info.st_mode):
        return "it is not a directory (a link or a file)"
    if info.st_uid != os.getuid():
        return f"it belongs to uid {info.st_uid}, not to you (uid {os.getuid()})"
    if info.st_mode & (0o077 if strict_mode else 0o022):
        return f"its mode {stat.S_IMODE(info.st_mode):o} lets other users in"
    return None


def _claim_private(directory: Path) -> str | None:
    """Create `directory` (mode 0700) unless something is there; why it is not a private
    directory of ours, or None."""
    try:
        directory.mkdir(mode=0o700)
    except FileExistsError:
        pass  # ours from an earlier run, or planted: looked at below
    except OSError as e:
        return f"it cannot be created ({e.strerror or e})"
    else:  # 0700 whatever the umask; through a descriptor, never through a link
        try:
            fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
            try:
                os.fchmod(fd, 0o700)
            finally:
                os.close(fd)
        except OSError as e:
            return f"it cannot be made private ({e.strerror or e})"
    return _private_problem(directory, strict_mode=True)


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning("%s", message)


def private_tmp_dir() -> Path:
    """This user's node-local private directory, <tmp>/rotalibi-<uid> (mode 0700, ours, not a
    link). When someone else made that path (or opened it up), the first of <tmp>/rotalibi-
    <uid>-1, -2, ... that is (or can be made) private to us: the same one run after run, so
    jobs still share the set-up lock and the shard cache. Should all of those be planted, a
    fresh temporary directory (a new one each time)."""
    base, uid = Path(tempfile.gettempdir()), os.getuid()
    preferred = base / f"rotalibi-{uid}"
    problem = _claim_private(preferred)
    if problem is None:
        return preferred
    refused = [f"{preferred}: {problem}"]
    for n in range(1, FALLBACKS + 1):
        fallback = base / f"rotalibi-{uid}-{n}"
        why = _claim_private(fallback)
        if why is None:
            _warn_once(f"not using {preferred}: {problem}; using {fallback} instead")
            return fallback
        refused.append(f"{fallback}: {why}")
    fresh = Path(tempfile.mkdtemp(prefix=f"rotalibi-{uid}-tmp-"))
    log.warning(
        "not using %s; using a fresh %s instead (not shared with other runs)",
        "; ".join(refused),
        fresh,
    )
    return fresh


def cache_root(cache_dir: str | None) -> Path:
    """The cache's root: data.cache_dir (ours, writable by us alone), else the private
    <tmp>/rotalibi-<uid>/streaming (node-local)."""
    if not cache_dir:
        root = private_tmp_dir() / "streaming"
        root.mkdir(mode=0o700, exist_ok=True)
        return root
    root = Path(cache_dir)
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    problem = _private_problem(root, strict_mode=False)
    if problem is not None:
        raise DatasetError(
            f"data.cache_dir {root} cannot hold a trusted cache: {problem}; use a directory "
            "of your own that only you can write (or leave data.cache_dir unset)"
        )
    return root


def _split_files(index: dict) -> dict[str, str]:
    """Every file a split's index names (raw and compressed shards): its expected xxh64."""
    return {
        info["basename"]: info.get("hashes", {}).get(HASH, "")
        for shard in index["shards"]
        for info in (shard.get("raw_data"), shard.get("zip_data"))
        if info
    }


def verify_cached_split(local: Path, source_index: bytes) -> list[str]:
    """Make the cached split directory `local` hold only what the source's index.json (its
    bytes) describes: another index, files the index does not name and shard files whose xxh64
    differs are deleted. Returns the files evicted."""
    if not local.is_dir():
        return []
    cached_index = local / INDEX
    if cached_index.is_file() and cached_index.read_bytes() != source_index:
        shutil.rmtree(local)
        return [f"{INDEX} (another dataset's index)"]
    expected = _split_files(json.loads(source_index))
    evicted = []
    for path in sorted(local.rglob("*")):
        name = str(path.relative_to(local))
        if path.is_dir() or name == INDEX:
            continue
        if name not in expected or get_hash(HASH, path.read_bytes()) != expected[name]:
            path.unlink()
            evicted.append(name)
    return evicted


class CacheSlot:
    """A cache directory this job holds exclusively (a file lock) until `release()`."""

    def __init__(self, directory: Path, lock: IO | None):
        self.directory = directory
        self._lock = lock

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing the file drops the lock
            self._lock = None


def claim_slot(key_dir: Path) -> CacheSlot:
    """Lock the first free slot of key_dir and unlink stale shared memory that names it."""
    n = 0
    while True:
        directory = key_dir / f"slot-{n}"
        directory.mkdir(parents=True, exist_ok=True)
        lock = open(directory / LOCK_FILE, "a")  # noqa: SIM115 (held open: it is the lock)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            n += 1
            continue
        clean_stale_shared_memory(directory)
        return CacheSlot(directory, lock)


def _registered_locals(prefix: int) -> list[str] | None:
    """The local directories streaming registered under `prefix`; None when nothing is, [] when
    another user's shared memory holds it (not ours to read or clean)."""
    try:
        shm = SharedMemory(_get_path(prefix, LOCALS), create=False, auto_cleanup=False)
    except FileNotFoundError:
        return None
    except PermissionError:
        return []
    data = bytes(shm.buf)
    shm.cleanup()
    size = int(np.frombuffer(data[:4], np.int32)[0])
    return data[4:size].decode("utf-8").split("\0")[:-1] if size > 4 else []


def clean_stale_shared_memory(directory: Path) -> list[int]:
    """Unlink every streaming shared memory prefix registered for a local directory under
    `directory`; the prefixes cleaned. Only call it holding the directory's slot lock."""
    inside = os.path.abspath(directory) + os.sep  # streaming registers abspath(local)
    cleaned, prefix = [], -1
    while True:
        prefix += 1
        registered = _registered_locals(prefix)
        has_filelock = any(
            os.path.exists(os.path.join(tempfile.gettempdir(), _get_path(prefix, name)))
            for name in (BARRIER_FILELOCK, CACHE_FILELOCK)
        )
        if registered is None and not has_filelock:
            return cleaned  # streaming allocates prefixes densely: none beyond this one
        if registered and any((d + os.sep).startswith(inside) for d in registered):
            for name in SHM_TO_CLEAN:
                try:
                    shm = BuiltinSharedMemory(_get_path(prefix, name))
                except (FileNotFoundError, PermissionError):
                    continue
                shm.close()
                shm.unlink()
            cleaned.append(prefix)


@contextmanager
def streaming_setup_lock() -> Iterator[None]:
    """Held by each node's local rank 0 while it sets up its StreamingDataset: streaming picks
    its shared-memory prefix by checking for a free one and then creating it, so two jobs that
    start together on one node could pick the same one (FileExistsError). The lock file is in
    this user's node-local private directory, whatever data.cache_dir is (a lock in a shared
    place could be held by anyone)."""
    with open(private_tmp_dir() / "streaming-setup.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield
