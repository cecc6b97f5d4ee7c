"""File formats: Tivita cubes and the reference dataset layout (`tivita`), blosc files (`htc`).

`atomic_write` lives here so that every writer in the package can share it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, *, text: bool = False) -> Iterator[IO]:
    """Writes a file atomically: a temporary file in the same folder, then `os.replace`.

    Readers never see a half-written file, and if the block raises, an existing file at `path`
    is left untouched and the temporary file is removed.

    Args:
      path: the file to write; its folder must exist.
      text: open in UTF-8 text mode instead of binary read-write mode.

    Yields:
      The open temporary file.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path}: the folder {path.parent} does not exist")
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        # Binary files are readable too: h5py reads back what it has written.
        with open(temporary, "x" if text else "x+b", encoding="utf-8" if text else None) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
