"""Scalar metrics as JSON lines (``metrics.jsonl``) and TensorBoard event files (tensorboardX).

Only process 0 writes; on the other processes the writer does nothing. When a run resumes from
the checkpoint at step s, rows that a crashed run logged after step s are dropped first (the
resumed run logs those steps again), so ``metrics.jsonl`` reads like one uninterrupted run. A
torn last line (a kill in the middle of a write, a full disk) is dropped with a warning; an
unreadable line before it is an error.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping

import jax
import tensorboardX

from xeno_jax.io import atomic_write


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
    """Rewrites `path` (atomically) without rows whose step is above `step`.

    Raises:
      ValueError: naming the file and line, for an unreadable row that is not the last line.
    """
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [(number, line) for number, line in enumerate(f, 1) if line.strip()]
    rows = []
    for number, line in lines:
        try:
            keep = int(json.loads(line)["step"]) <= step
        except (ValueError, TypeError, KeyError) as e:
            if number < lines[-1][0]:
                raise ValueError(f"{path}, line {number}: not a metrics row ({e}); fix or "
                                 "delete that line to resume") from None
            logging.warning("%s: dropping the torn last line %d (%s): %r", path, number, e,
                            line[:80])
            continue
        if keep:
            rows.append(line if line.endswith("\n") else line + "\n")
    with atomic_write(path, text=True) as f:
        f.writelines(rows)
