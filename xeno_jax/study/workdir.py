"""A work directory that several processes share: build-once locks and run claims.

Study processes and workers (on one machine or on the nodes of a cluster, the work directory
on a shared file system) coordinate through OS file locks (`filelock`), never through marker
files, so a lock held by a process that dies is released with it:

- `build_once` makes a file or folder (a dataset, a projection bank, the data specs) in exactly
  one process; the others wait for it and then use what it made;
- `claim` is the lock of a run directory (``<run>/run.lock``): the process that holds it is the
  one that trains the run. A worker that dies (killed, out of memory, preempted) releases its
  claim, and the next worker that asks for the run takes it over and resumes from the run's last
  checkpoint. The lock is a per-process singleton, so code inside the claim (e.g. the training
  loop guarding its own work directory) may take the same lock again without deadlocking.

The locks are `xeno_jax.io.lock.exclusive` locks, as the lock a training run holds on its own
directory (`xeno_jax.io.lock.workdir_lock`, ``<run>/.lock``), which a worker takes inside its
claim: POSIX ``flock`` locks: on NFS they work where the mount supports them (NFSv4, or
v3 with the lock manager). On a file system without ``flock`` acquiring one is an error rather
than a fall-back to lock files, which a dead process would leave behind.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import filelock
import jax
from jax.experimental import multihost_utils

from xeno_jax.io.lock import exclusive

RUN_LOCK = "run.lock"


def run_lock(directory: str | os.PathLike) -> filelock.BaseFileLock:
    """The lock whose holder trains the run in `directory` (one instance per process)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return exclusive(directory / RUN_LOCK)


@contextlib.contextmanager
def claim(directory: str | os.PathLike, *, wait: bool = True) -> Iterator[bool]:
    """Holds the claim on a run directory for the block; yields whether it was obtained.

    Args:
      directory: the run's work directory.
      wait: wait for a claim held elsewhere (until its holder finishes or dies); False yields
        False at once when another process holds it.
    """
    lock = run_lock(directory)
    try:
        lock.acquire(blocking=wait)
    except filelock.Timeout:
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


def is_claimed(directory: str | os.PathLike) -> bool:
    """Whether another process holds the claim on `directory` right now."""
    with claim(directory, wait=False) as obtained:
        return not obtained


def build_once(lock: str | os.PathLike, exists: Callable[[], bool], build: Callable[[], None],
               *, what: str) -> None:
    """Runs `build` unless `exists()`, in one process at a time.

    In a job of several processes (multi-host JAX), process 0 goes first and the others wait
    for it at a barrier, then find the target (a shared file system) or make their own copy
    (a disk of their own); every process of the job must call this for the same targets in the
    same order, as they do when they run the same program.

    Args:
      lock: the lock file (on the file system of what `build` makes; its folder is created).
      exists: whether the target is complete (checked before and again under the lock).
      build: makes the target; it must leave either nothing or a complete target.
      what: the target in words, for the log.
    """
    first = jax.process_index() == 0
    if not first:
        _barrier(what)
    try:
        _build_locked(Path(lock), exists, build, what)
    finally:
        if first:
            _barrier(what)


def _barrier(what: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"build_once: {what}")


def _build_locked(lock: Path, exists: Callable[[], bool], build: Callable[[], None],
                  what: str) -> None:
    if exists():
        return
    lock.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with exclusive(lock):
        waited = time.monotonic() - started
        if exists():
            logging.info("%s: made by another process (waited %.0f s)", what, waited)
            return
        logging.info("%s: building (%s, pid %d)", what, socket.gethostname(), os.getpid())
        build()
