"""One training process per run directory: an exclusive lock file, and a write probe.

`RUN/.lock` holds its holder (host, pid, SLURM job, a random token) as JSON. It is created with
a hard link from a file of our own, which is atomic on local and network file systems alike; a
second start finds it and stops, naming the holder. The holder touches it every
HEARTBEAT_S seconds. A lock is stale, and taken over with a warning, when its holder's process
is gone (same host), when it belongs to an earlier attempt of this very SLURM job (a requeued
job may land on another node after a hard kill), or when it has not been touched for
STALE_AFTER_S seconds (its host died).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from pathlib import Path

from data.prepare import process_alive

log = logging.getLogger("rotalibi")

LOCK_FILE = ".lock"
HEARTBEAT_S = 60
STALE_AFTER_S = 600


class RunDirError(ValueError):
    """The run directory cannot be used for this config (or by this process)."""


def slurm_job() -> str | None:
    """The id squeue shows for this job: "<array>_<task>" for an array task."""
    env = os.environ
    if "SLURM_ARRAY_JOB_ID" in env and "SLURM_ARRAY_TASK_ID" in env:
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID")


def _describe(holder: dict) -> str:
    job = f", SLURM job {holder['job']}" if holder.get("job") else ""
    return f"host {holder.get('host')} pid {holder.get('pid')}{job}, since {holder.get('since')}"


def _stale(holder: dict, age_s: float) -> str | None:
    """Why the lock of `holder` (last touched `age_s` ago) no longer holds, or None."""
    if holder.get("host") == socket.gethostname() and not process_alive(int(holder.get("pid", -1))):
        return "its process is gone"
    if holder.get("job") and holder["job"] == slurm_job():
        return "an earlier attempt of this SLURM job held it"
    if age_s > STALE_AFTER_S:
        return f"no heartbeat for {age_s:.0f} s"
    return None


def probe_writable(directory: Path) -> None:
    """Create `directory` and write a file in it, or RunDirError naming the path and free space."""
    from launch.checkpoint import free_space

    probe = directory / f".write-probe-{secrets.token_hex(4)}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"\0" * 4096)
        probe.unlink()
    except OSError as e:
        raise RunDirError(
            f"cannot write to {directory}: {e.strerror or e} ({free_space(directory)}); "
            "choose another run.dir or free the space"
        ) from None


class RunLock:
    """The exclusive lock of a run directory, held from `acquire` to `release`."""

    def __init__(self, path: Path, token: str):
        self.path, self.token = path, token
        self._stop = threading.Event()
        self._heartbeat = threading.Thread(target=self._beat, name="run-lock", daemon=True)
        self._heartbeat.start()

    @classmethod
    def acquire(cls, run_dir: Path) -> RunLock:
        """Take the lock of `run_dir` (created if needed), or RunDirError naming its holder."""
        probe_writable(run_dir)
        path, token = run_dir / LOCK_FILE, secrets.token_hex(8)
        holder = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "job": slurm_job(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "token": token,
        }
        mine = run_dir / f"{LOCK_FILE}.{token}"
        mine.write_text(json.dumps(holder))
        try:
            for _ in range(10):  # a takeover raced with another process: look again
                try:
                    os.link(mine, path)
                    return cls(path, token)
                except FileExistsError:
                    pass
                try:
                    other, age_s = json.loads(path.read_text()), time.time() - path.stat().st_mtime
                except FileNotFoundError:
                    continue  # released meanwhile
                except (OSError, ValueError):
                    other, age_s = {}, time.time() - path.stat().st_mtime
                reason = _stale(other, age_s)
                if reason is None:
                    raise RunDirError(
                        f"{run_dir} is in use by another training process ({_describe(other)}); "
                        "wait for it, stop it, or choose another run.name"
                    )
                log.warning("taking over the stale lock of %s: %s", run_dir, reason)
                try:  # one of several racing processes wins this rename; the rest look again
                    os.rename(path, run_dir / f"{LOCK_FILE}.stale-{token}")
                    (run_dir / f"{LOCK_FILE}.stale-{token}").unlink()
                except FileNotFoundError:
                    pass
            raise RunDirError(f"could not take the lock {path}: other processes keep taking it")
        finally:
            mine.unlink()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError as e:
                log.warning("cannot touch the run lock %s: %s", self.path, e)

    def release(self) -> None:
        """Stop the heartbeat and remove the lock, if it is still ours."""
        self._stop.set()
        try:
            if json.loads(self.path.read_text()).get("token") == self.token:
                self.path.unlink()
        except (OSError, ValueError):
            pass
