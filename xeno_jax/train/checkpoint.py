"""Checkpoints: a thin wrapper around an orbax ``CheckpointManager`` with explicit args.

A checkpoint ``<workdir>/checkpoints/<step>/`` holds three items:

* ``state``: the whole `TrainState` (params, batch stats, optimiser state, step, PRNG key, SWA
  average and count), saved from and restored into global arrays on the data mesh;
* ``data_iterator``: every process's data-iterator state (``get_state()``, JSON or bytes), one
  file per process, restored with ``set_state`` so a resumed run sees exactly the batches it
  would have seen;
* ``config``: the training config as JSON, for the record.

Orbax writes a checkpoint into a temporary directory and renames it when complete, so a crash
never leaves a half-written checkpoint behind; ``max_to_keep`` bounds how many are kept.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
from typing import Any, Protocol

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath


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
) -> None:
    """Saves `state` (at its own step), the iterator state and the config (asynchronously).

    The iterator's state is read here, before the call returns, so the caller may go on
    drawing batches. Call ``manager.wait_until_finished()`` before reading the checkpoint or
    exiting.
    """
    step = int(jax.device_get(state.step.addressable_data(0)))
    manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data_iterator=DataIteratorSave(data_iterator.get_state()),
            config=ocp.args.JsonSave(json.loads(config.to_json())),
        ),
    )


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
    """
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {manager.directory}")
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
        items["data_iterator"] = DataIteratorRestore(data_iterator)
    return manager.restore(step, args=ocp.args.Composite(**items)).state
