"""Scalar metrics as JSON lines (``metrics.jsonl``) and TensorBoard event files (tensorboardX).

Only process 0 writes; on the other processes the writer does nothing. When a run resumes from
the checkpoint at step s, rows that a crashed run logged after step s are dropped first (the
resumed run logs those steps again), so ``metrics.jsonl`` reads like one uninterrupted run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import jax
import tensorboardX


class MetricsWriter:
    """Writes ``{"step": s, name: value, ...}`` rows to `workdir`.

    Args:
      workdir: directory for ``metrics.jsonl`` and the ``tensorboard/`` event files.
      resume_step: step of the checkpoint the run resumes from; later rows are dropped.
    """

    def __init__(self, workdir: str, *, resume_step: int = 0):
        self._active = jax.process_index() == 0
        if not self._active:
            return
        os.makedirs(workdir, exist_ok=True)
        self._path = os.path.join(workdir, "metrics.jsonl")
        _drop_rows_after(self._path, resume_step)
        self._jsonl = open(self._path, "a")
        self._tensorboard = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        """Logs scalars for `step`."""
        if not self._active:
            return
        row = {"step": int(step), **{name: float(value) for name, value in metrics.items()}}
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        for name, value in row.items():
            if name != "step":
                self._tensorboard.add_scalar(name, value, global_step=row["step"])
        self._tensorboard.flush()

    def close(self) -> None:
        if self._active:
            self._jsonl.close()
            self._tensorboard.close()


def _drop_rows_after(path: str, step: int) -> None:
    """Rewrites `path` (atomically) without rows whose step is above `step`."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        rows = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(rows)
    os.replace(tmp, path)
