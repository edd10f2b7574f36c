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
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing.shared_memory import SharedMemory as BuiltinSharedMemory
from pathlib import Path
from typing import IO

import numpy as np
from streaming.base.constant import BARRIER_FILELOCK, CACHE_FILELOCK, LOCALS, SHM_TO_CLEAN
from streaming.base.shared import SharedMemory
from streaming.base.shared.prefix import _get_path

LOCK_FILE = ".lock"


def cache_root(cache_dir: str | None) -> Path:
    """The cache's root: data.cache_dir, else <tmp>/rotalibi-streaming (node-local)."""
    return Path(cache_dir) if cache_dir else Path(tempfile.gettempdir()) / "rotalibi-streaming"


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
    """The local directories streaming registered under `prefix`; None when nothing is."""
    try:
        shm = SharedMemory(_get_path(prefix, LOCALS), create=False, auto_cleanup=False)
    except FileNotFoundError:
        return None
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
                except FileNotFoundError:
                    continue
                shm.close()
                shm.unlink()
            cleaned.append(prefix)


@contextmanager
def streaming_setup_lock() -> Iterator[None]:
    """Held by each node's local rank 0 while it sets up its StreamingDataset: streaming picks
    its shared-memory prefix by checking for a free one and then creating it, so two jobs that
    start together on one node could pick the same one (FileExistsError). The lock file is in
    the node-local temporary directory, whatever data.cache_dir is."""
    with open(Path(tempfile.gettempdir()) / "rotalibi-streaming-setup.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield
