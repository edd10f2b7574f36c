"""One training process per run directory: an exclusive lock file, and a write probe.

`RUN/.lock` holds its holder (host, pid, the process's start time, SLURM job, a random token)
as JSON. It is created with a hard link from a file of our own, which is atomic on local and
network file systems alike; a second start finds it and stops, naming the holder. The holder
touches it every HEARTBEAT_S seconds. Whether a lock found there still holds:

- Its holder is on this host: it holds exactly as long as that process lives (the pid exists
  and, where /proc tells, started when the lock says, so a reused pid does not count), whatever
  its SLURM job and however long since its last heartbeat. Another step of the same job, a
  second launch inside one allocation, a requeue racing the old process: all are refused.
- Its holder is on another host: it holds while it is touched. Untouched for STALE_AFTER_S
  seconds, its host died: stale. One left by this very SLURM job (a requeued job landing on
  another node after a hard kill) is stale sooner, once untouched for SAME_JOB_STALE_S
  seconds (three heartbeats); while it is fresher than that the start waits for it, and
  refuses if it is touched meanwhile (its holder lives: a node cut off from SLURM, not from
  the file system, or another launch of the job).
- It is not a regular file (a symbolic link, dangling or not, a FIFO, a directory): it is never
  opened or taken over; the start stops naming it, for a person to remove.
- It is a regular file but not a lock this module wrote (not JSON, not an object, a pid that is
  not a positive integer...): its holder cannot be known, so only its age counts. Touched in
  the last STALE_AFTER_S seconds, the start stops naming what is wrong with it; older, it is
  taken over with a warning naming that.

A stale lock is taken over with a warning.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import secrets
import socket
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from data.prepare import process_alive

log = logging.getLogger("rotalibi")

LOCK_FILE = ".lock"
HEARTBEAT_S = 60
STALE_AFTER_S = 600
SAME_JOB_STALE_S = 3 * HEARTBEAT_S  # an attempt of this job elsewhere, if untouched this long
POLL_S = 5.0  # how often a start waiting on such a lock looks at it again
MAX_LOCK_BYTES = 64 * 1024  # a lock file longer than this is not one of ours


class RunDirError(ValueError):
    """The run directory cannot be used for this config (or by this process)."""


def slurm_job() -> str | None:
    """The id squeue shows for this job: "<array>_<task>" for an array task."""
    env = os.environ
    if "SLURM_ARRAY_JOB_ID" in env and "SLURM_ARRAY_TASK_ID" in env:
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID")


def process_start(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot, from /proc), None if unknown."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
        return int(text[text.rindex(")") + 2 :].split()[19])  # field 22, after "(comm)"
    except (OSError, ValueError, IndexError):
        return None


@dataclass(frozen=True)
class _Found:
    """A lock file as read: its holder (None when `problem` says why it is not one of ours),
    its bytes, inode and modification time."""

    holder: dict | None
    problem: str | None
    raw: bytes
    inode: int
    mtime: float

    @property
    def age_s(self) -> float:
        return time.time() - self.mtime


def _holder_problem(holder: object) -> str | None:
    """Why `holder` (parsed JSON) is not a lock this module wrote, or None."""
    if not isinstance(holder, dict):
        return f"it holds a JSON {type(holder).__name__}, not an object"
    host, pid = holder.get("host"), holder.get("pid")
    if not isinstance(host, str) or not host:
        return f"its host {host!r} is not a host name"
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return f"its pid {pid!r} is not a positive integer"
    for key, kind in (("job", str), ("started", int), ("token", str), ("since", str)):
        value = holder.get(key)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            return f"its {key} {value!r} is not a {kind.__name__}"
    return None


def _kind(path: Path, mode: int) -> str:
    if stat.S_ISLNK(mode):
        try:
            return f"a symbolic link (to {os.readlink(path)})"
        except OSError:
            return "a symbolic link"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a device or other special file"


def _not_a_lock(path: Path, mode: int) -> RunDirError:
    return RunDirError(
        f"the lock {path} is {_kind(path, mode)}, not a lock file; it is never opened or taken "
        f"over: remove it if no training process uses {path.parent}"
    )


def _read_lock(path: Path) -> _Found | None:
    """The lock file at `path`, None if there is none. Only a regular file is opened (never
    through a link, never blocking); anything else is a RunDirError naming it."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise RunDirError(f"cannot read the lock {path}: {e.strerror or e}") from None
    if not stat.S_ISREG(info.st_mode):
        raise _not_a_lock(path, info.st_mode)
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:  # replaced by a link since the lstat
            raise _not_a_lock(path, stat.S_IFLNK) from None
        raise RunDirError(f"cannot read the lock {path}: {e.strerror or e}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise _not_a_lock(path, info.st_mode)
        raw = b""
        while len(raw) <= MAX_LOCK_BYTES:
            chunk = os.read(fd, MAX_LOCK_BYTES + 1 - len(raw))
            if not chunk:
                break
            raw += chunk
    except OSError as e:
        raise RunDirError(f"cannot read the lock {path}: {e.strerror or e}") from None
    finally:
        os.close(fd)
    holder, problem = None, None
    if len(raw) > MAX_LOCK_BYTES:
        problem = f"it is longer than {MAX_LOCK_BYTES} bytes"
    elif not raw.strip():
        problem = "it is empty"
    else:
        try:
            holder = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            problem = "it is not JSON"
        else:
            problem = _holder_problem(holder)
    if problem is not None:
        holder = None
    return _Found(holder, problem, raw, info.st_ino, info.st_mtime)


def _describe(holder: dict) -> str:
    job = f", SLURM job {holder['job']}" if holder.get("job") else ""
    return f"host {holder.get('host')} pid {holder.get('pid')}{job}, since {holder.get('since')}"


def _process_gone(holder: dict) -> str | None:
    """Why the process of a holder on this host is gone, or None while it lives."""
    pid = holder["pid"]
    if not process_alive(pid):
        return "its process is gone"
    started, now = holder.get("started"), process_start(pid)
    if started is not None and now is not None and now != started:
        return f"its process is gone (pid {pid} is now another process's)"
    return None


def _same_job_elsewhere(found: _Found) -> bool:
    holder, job = found.holder, slurm_job()
    return (
        holder is not None
        and holder["host"] != socket.gethostname()
        and job is not None
        and holder.get("job") == job
    )


def _stale(found: _Found) -> str | None:
    """Why the lock `found` no longer holds, or None (see the module's docstring)."""
    age_s = found.age_s
    if found.holder is None:
        if age_s > STALE_AFTER_S:
            return (
                f"it is not a lock file of ours ({found.problem}) and untouched for {age_s:.0f} s"
            )
        return None
    if found.holder["host"] == socket.gethostname():
        return _process_gone(found.holder)  # a live process holds it, whatever its age or job
    if _same_job_elsewhere(found) and age_s > SAME_JOB_STALE_S:
        return f"an earlier attempt of this SLURM job held it (no heartbeat for {age_s:.0f} s)"
    if age_s > STALE_AFTER_S:
        return f"no heartbeat for {age_s:.0f} s"
    return None


def _await_heartbeat(path: Path, found: _Found) -> tuple[str | None, bool]:
    """Watch a fresh lock of this SLURM job held on another host until it is stale (its
    reason, False) or touched (None, False: its holder lives); (None, True) if it was released
    or replaced meanwhile (look again)."""
    log.warning(
        "%s is locked by this SLURM job on another host (%s), touched %.0f s ago: waiting up "
        "to %d s for its heartbeat",
        path.parent,
        _describe(found.holder),
        found.age_s,
        SAME_JOB_STALE_S,
    )
    while (reason := _stale(found)) is None:
        time.sleep(max(0.05, min(POLL_S, SAME_JOB_STALE_S - found.age_s + 0.05)))
        now = _read_lock(path)
        if now is None or (now.raw, now.inode) != (found.raw, found.inode):
            return None, True
        if now.mtime != found.mtime:
            return None, False
    return reason, False


def probe_writable(directory: Path) -> None:
    """Create `directory` and write a file in it, or RunDirError naming the path and free space."""
    from training.checkpoint import free_space

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
            "started": process_start(os.getpid()),
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
                found = _read_lock(path)
                if found is None:
                    continue  # released meanwhile
                reason = _stale(found)
                if reason is None and _same_job_elsewhere(found):
                    reason, changed = _await_heartbeat(path, found)
                    if changed:
                        continue
                if reason is None:
                    raise cls._in_use(run_dir, found)
                log.warning("taking over the stale lock of %s: %s", run_dir, reason)
                cls._remove(path, found, run_dir / f"{LOCK_FILE}.stale-{token}")
            raise RunDirError(f"could not take the lock {path}: other processes keep taking it")
        finally:
            mine.unlink()

    @staticmethod
    def _in_use(run_dir: Path, found: _Found) -> RunDirError:
        if found.holder is None:
            return RunDirError(
                f"{run_dir} is locked by {run_dir / LOCK_FILE}, which is not a lock file of "
                f"ours ({found.problem}), touched {found.age_s:.0f} s ago; it is taken over once "
                f"untouched for {STALE_AFTER_S} s: remove it if no training process uses "
                f"{run_dir}"
            )
        return RunDirError(
            f"{run_dir} is in use by another training process ({_describe(found.holder)}); "
            "wait for it, stop it, or choose another run.name"
        )

    @staticmethod
    def _remove(path: Path, found: _Found, aside: Path) -> None:
        """Remove the stale lock `found` from `path`. One of several racing processes wins the
        rename; if what it moved aside is not the lock judged stale (a new holder's, taken in
        between), it is put back."""
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return
        try:
            moved = _read_lock(aside)
        except RunDirError:
            moved = None
        if moved is not None and (moved.raw, moved.inode) != (found.raw, found.inode):
            try:
                os.link(aside, path)
            except FileExistsError:
                log.warning("the lock of %s changed hands while it was taken over", path.parent)
        aside.unlink()

    def _holds(self) -> bool:
        try:
            found = _read_lock(self.path)
        except RunDirError:
            return False
        return (
            found is not None
            and found.holder is not None
            and (found.holder.get("token") == self.token)
        )

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            if not self._holds():
                log.warning("the run lock %s is no longer this process's", self.path)
                return
            try:
                os.utime(self.path, follow_symlinks=False)
            except OSError as e:
                log.warning("cannot touch the run lock %s: %s", self.path, e)

    def release(self) -> None:
        """Stop the heartbeat and remove the lock, if it is still ours."""
        self._stop.set()
        if self._holds():
            with contextlib.suppress(OSError):
                self.path.unlink()
