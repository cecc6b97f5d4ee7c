"""Checkpoints: a thin wrapper around an orbax ``CheckpointManager`` with explicit args.

A checkpoint ``<workdir>/checkpoints/<step>/`` holds four items:

* ``state``: the whole `TrainState` (params, batch stats, optimiser state, step, PRNG key, SWA
  average and count), saved from and restored into global arrays on the data mesh;
* ``data_iterator``: every process's data-iterator state (``get_state()``, JSON or bytes), one
  file per process, restored with ``set_state`` so a resumed run sees exactly the batches it
  would have seen;
* ``config``: the training config as JSON, for the record;
* ``fingerprint``: the run's `xeno_jax.train.fingerprint` record, compared before resuming.

Orbax writes a checkpoint into a temporary directory and renames it when complete, so a crash
never leaves a half-written checkpoint behind; ``max_to_keep`` bounds how many are kept. A
checkpoint damaged afterwards (a disk error, a partial copy) is skipped by
`restore_newest_intact`, which moves it to ``<workdir>/checkpoints_skipped/`` and says why.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

SKIPPED_FOLDER = "checkpoints_skipped"


class CorruptCheckpointError(RuntimeError):
    """A checkpoint cannot be read back (damaged, incomplete or of another layout)."""


class DataIterator(Protocol):
    """What the loop needs of a data iterator (grain's ``DatasetIterator`` protocol)."""

    def __next__(self) -> Any: ...

    def get_state(self) -> Any: ...

    def set_state(self, state: Any) -> None: ...


class DataIteratorHandler(ocp.CheckpointHandler):
    """Saves each process's iterator state as ``process_<i>-of-<n>.json``.

    ``get_state()`` may return a JSON-serialisable value (grain ``DatasetIterator``) or bytes
    (grain ``DataLoader`` iterators); bytes are stored base64-encoded.
    """

    def save(self, directory: epath.Path, args: DataIteratorSave) -> None:
        state = args.state
        if isinstance(state, bytes):
            record = {"encoding": "base64", "state": base64.b64encode(state).decode("ascii")}
        else:
            record = {"encoding": "json", "state": state}
        directory.mkdir(parents=True, exist_ok=True)
        _process_file(directory).write_text(json.dumps(record))

    def restore(self, directory: epath.Path, args: DataIteratorRestore) -> DataIterator:
        path = _process_file(directory)
        if not path.exists():
            raise FileNotFoundError(
                f"no data-iterator state {path}: the checkpoint was written by a run with a "
                f"different number of processes"
            )
        record = json.loads(path.read_text())
        state = record["state"]
        if record["encoding"] == "base64":
            state = base64.b64decode(state)
        args.iterator.set_state(state)
        return args.iterator

    def metadata(self, directory: epath.Path) -> None:
        del directory

    def finalize(self, directory: epath.Path) -> None:
        del directory

    def close(self) -> None:
        pass


def _process_file(directory: epath.Path) -> epath.Path:
    return directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"


@ocp.args.register_with_handler(DataIteratorHandler, for_save=True)
@dataclasses.dataclass
class DataIteratorSave(ocp.args.CheckpointArgs):
    """The iterator's ``get_state()``, taken when the save is requested."""

    state: Any


@ocp.args.register_with_handler(DataIteratorHandler, for_restore=True)
@dataclasses.dataclass
class DataIteratorRestore(ocp.args.CheckpointArgs):
    """The iterator whose ``set_state`` receives the saved state."""

    iterator: DataIterator


def checkpoint_manager(workdir: str, *, max_to_keep: int | None) -> ocp.CheckpointManager:
    """The manager of ``<workdir>/checkpoints`` (created if missing).

    Args:
      workdir: the run's work directory.
      max_to_keep: newest checkpoints to keep; None keeps all.
    """
    return ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), "checkpoints"),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
    )


def save_checkpoint(
    manager: ocp.CheckpointManager,
    state: Any,
    data_iterator: DataIterator,
    config: ml_collections.ConfigDict,
    fingerprint: Mapping[str, Any] | None = None,
) -> None:
    """Saves `state` (at its own step), the iterator state, the config and the fingerprint
    record (``Fingerprint.to_json()``, if given), asynchronously.

    The iterator's state is read here, before the call returns, so the caller may go on
    drawing batches. Call ``manager.wait_until_finished()`` before reading the checkpoint or
    exiting.
    """
    step = int(jax.device_get(state.step.addressable_data(0)))
    items = {
        "state": ocp.args.StandardSave(state),
        "data_iterator": DataIteratorSave(data_iterator.get_state()),
        "config": ocp.args.JsonSave(json.loads(config.to_json())),
    }
    if fingerprint is not None:
        items["fingerprint"] = ocp.args.JsonSave(dict(fingerprint))
    manager.save(step, args=ocp.args.Composite(**items))


def restore_checkpoint(
    manager: ocp.CheckpointManager,
    abstract_state: Any,
    data_iterator: DataIterator | None = None,
    *,
    step: int | None = None,
) -> Any:
    """Restores a train state and, if given, the data iterator's position.

    Args:
      manager: the checkpoint manager.
      abstract_state: pytree of ``jax.ShapeDtypeStruct`` with shardings (e.g.
        ``jax.eval_shape`` of the state initialiser with the mesh shardings), the target layout.
      data_iterator: iterator whose ``set_state`` receives the saved state; None skips it.
      step: the checkpoint to restore; None means the latest.

    Returns:
      The restored state.

    Raises:
      FileNotFoundError: if the manager's directory has no checkpoint.
      CorruptCheckpointError: naming the checkpoint and the reason, if it cannot be read.
    """
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {manager.directory}")
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
        items["data_iterator"] = DataIteratorRestore(data_iterator)
    try:
        return manager.restore(step, args=ocp.args.Composite(**items)).state
    except Exception as e:  # orbax, tensorstore and json raise many types for damaged files
        raise CorruptCheckpointError(
            f"the checkpoint {_step_dir(manager, step)} cannot be restored: {_reason(e)}") from e


def read_fingerprint(manager: ocp.CheckpointManager, step: int) -> dict[str, Any] | None:
    """The fingerprint record stored with a checkpoint, or None if it has none.

    Raises:
      CorruptCheckpointError: if the record exists but cannot be read.
    """
    if not (_step_dir(manager, step) / "fingerprint").exists():
        return None
    try:
        return manager.restore(
            step, args=ocp.args.Composite(fingerprint=ocp.args.JsonRestore())).fingerprint
    except Exception as e:
        raise CorruptCheckpointError(
            f"the fingerprint of the checkpoint {_step_dir(manager, step)} cannot be read: "
            f"{_reason(e)}") from e


def restore_newest_intact(
    manager: ocp.CheckpointManager,
    abstract_state: Any,
    data_iterator: DataIterator | None = None,
    *,
    check_fingerprint: Callable[[int, dict[str, Any] | None], None] | None = None,
) -> Any:
    """Restores the newest checkpoint that can be read, moving newer damaged ones aside.

    Checkpoints are tried newest first. One that cannot be read is logged (which, and why) and,
    once an older one has been restored, moved to ``<workdir>/checkpoints_skipped/<step>``
    (kept for inspection, and out of the way of the checkpoints the resumed run writes).

    Args:
      manager: the checkpoint manager; it must hold at least one checkpoint.
      abstract_state: the target layout, as for `restore_checkpoint`.
      data_iterator: as for `restore_checkpoint`.
      check_fingerprint: called with a checkpoint's step and stored fingerprint record (None if
        it has none) before its state is restored; raise to refuse the checkpoint.

    Returns:
      The restored state.

    Raises:
      CorruptCheckpointError: listing every checkpoint and why, if none can be read.
    """
    skipped = []
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            stored = read_fingerprint(manager, step)
            if check_fingerprint is not None:
                check_fingerprint(step, stored)  # its errors are not about damage: they pass
            state = restore_checkpoint(manager, abstract_state, data_iterator, step=step)
        except CorruptCheckpointError as e:
            skipped.append((step, str(e)))
            logging.warning("skipping checkpoint: %s", e)
            continue
        if skipped:
            _move_aside(manager, [s for s, _ in skipped])
            logging.warning("resumed from the checkpoint %s instead", _step_dir(manager, step))
        return state
    raise CorruptCheckpointError(
        f"no checkpoint in {manager.directory} can be restored:\n"
        + "\n".join(f"  step {s}: {why}" for s, why in skipped))


def _step_dir(manager: ocp.CheckpointManager, step: int) -> epath.Path:
    return epath.Path(manager.directory) / str(step)


def _reason(error: Exception) -> str:
    """The first line of an exception (at most 300 characters), with its type."""
    lines = str(error).strip().splitlines()
    line = lines[0] if lines else ""
    return f"{type(error).__name__}: {line[:300]}{' ...' if len(line) > 300 else ''}"


def _move_aside(manager: ocp.CheckpointManager, steps: list[int]) -> None:
    """Moves damaged checkpoints to ``<workdir>/checkpoints_skipped/<step>[.<n>]``."""
    if jax.process_index() != 0:  # one process moves; the others wait for it below
        steps = []
    folder = epath.Path(manager.directory).parent / SKIPPED_FOLDER
    for step in steps:
        folder.mkdir(parents=True, exist_ok=True)
        target, n = folder / str(step), 0
        while target.exists():
            n += 1
            target = folder / f"{step}.{n}"
        shutil.move(str(_step_dir(manager, step)), str(target))
        logging.warning("moved the damaged checkpoint %s to %s", _step_dir(manager, step), target)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("xeno_jax: damaged checkpoints moved aside")
    manager.reload()
