"""File locks (`filelock`): `exclusive` for any stage one process at a time may run, and
`workdir_lock`, one writer per work directory.

Every lock is an OS ``flock`` lock (never a fall-back to lock files, which a dead process would
leave behind) and one instance per process and path (a singleton), so the operating system
releases it when its process dies, however it dies.

The work-directory lock is ``<workdir>/.lock``; while it is held, ``<workdir>/.lock.holder.json``
names the holder (pid, host, what it does, since when) so that a second process can say who it
is. A killed run never leaves a stale lock behind (only a stale holder file, which the next
holder replaces).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import filelock

from xeno_jax.io import atomic_write

LOCK_FILE = ".lock"
HOLDER_FILE = ".lock.holder.json"


class WorkdirBusyError(RuntimeError):
    """Another process holds the lock of a work directory."""


def exclusive(path: str | os.PathLike) -> filelock.BaseFileLock:
    """The lock on `path` (its folder must exist): one instance per process, so code that holds
    it may take it again (reentrant); other processes wait or are refused.

    On a file system without ``flock`` acquiring it is an error, not a silent lock file.
    """
    return filelock.FileLock(path, is_singleton=True, fallback_to_soft=False)


@contextlib.contextmanager
def workdir_lock(workdir: str | os.PathLike, purpose: str, *, enabled: bool = True
                 ) -> Iterator[None]:
    """Holds the lock of `workdir` (created if missing) for the block, without waiting.

    Args:
      workdir: the work directory.
      purpose: what the holder does, for the other process's message (e.g. "training").
      enabled: False does nothing (the processes of a multi-process run other than 0).

    Raises:
      WorkdirBusyError: naming the holder, if another process (or this one, already) holds
        the lock.
    """
    if not enabled:
        yield
        return
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    lock = exclusive(workdir / LOCK_FILE)
    try:
        if lock.is_locked:  # by this process: a second writer here is refused as well
            raise filelock.Timeout(str(lock.lock_file))
        lock.acquire(blocking=False)
    except filelock.Timeout:
        raise WorkdirBusyError(
            f"{workdir} is in use by {_holder(workdir)}; wait until it has finished or use "
            "another work directory") from None
    try:
        with atomic_write(workdir / HOLDER_FILE, text=True) as f:
            json.dump({"pid": os.getpid(), "host": socket.gethostname(), "purpose": purpose,
                       "since": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                       "command": " ".join(sys.argv)}, f)
        yield
    finally:
        (workdir / HOLDER_FILE).unlink(missing_ok=True)
        lock.release()


def _holder(workdir: Path) -> str:
    try:
        holder = json.loads((workdir / HOLDER_FILE).read_text(encoding="utf-8"))
        return (f"{holder['purpose']} (pid {holder['pid']} on host {holder['host']}, since "
                f"{holder['since']}: {holder['command']})")
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (its pid and host are not recorded yet)"
