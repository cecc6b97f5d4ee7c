"""The reference implementation's blosc files (htc ``blosc_compression.py``), read safely.

A file is a pickled header followed by blosc1 chunks (zstd, level 9, byte shuffle, typesize =
itemsize):

- one array: ``pickle((shape, dtype))``, then its chunk;
- a dict of arrays: ``pickle({key: (shape, dtype, compressed_nbytes)})``, then the chunks in key
  order.

The header is read by an unpickler that knows a single global, ``numpy.dtype``, and builds it only
for a plain bool or numeric type code, so opening a file can never run code. Annotations
(``intermediates/segmentations/<image_name>.blosc``) are dicts ``{annotation_name: uint8[H, W]}``;
projection banks are dicts ``{label_name: float32[n, 100, 101]}``.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import blosc
import numpy as np

from xeno_jax.io import atomic_write

_SUPPORTED_DTYPES = {
    np.dtype(t).__reduce__()[1][0]: np.dtype(t)
    for t in (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32,
              np.uint64, np.float16, np.float32, np.float64, np.complex64, np.complex128)
}
"""Pickled type code (``'f4'``) -> dtype, for every dtype a file may hold."""

_BYTE_ORDERS = frozenset("<>|=")
_PICKLE_PROTOCOL = 4  # the default of the Python versions the reference runs on
# version, versionlz, flags, typesize, nbytes, blocksize, cbytes
_BLOSC_HEADER = struct.Struct("<BBBBIII")
_COMPRESSION = {"clevel": 9, "cname": "zstd", "shuffle": blosc.SHUFFLE}


class _RefusedGlobal(Exception):
    """A header pickle names a global other than ``numpy.dtype``."""


class _UnsupportedDtype(Exception):
    """A header pickle builds a ``numpy.dtype`` that is not a plain bool or numeric type."""


class _PickledDtype:
    """What the header unpickler builds for ``numpy.dtype(code, False, True)``.

    Pickle then calls `__setstate__` with NumPy's dtype state; only the byte order may differ
    from that of the plain dtype of `code`.
    """

    __slots__ = ("dtype",)

    def __init__(self, dtype: np.dtype):
        self.dtype = dtype

    def __setstate__(self, state: Any) -> None:
        plain = self.dtype.__reduce__()[2]
        if not (isinstance(state, tuple) and len(state) == len(plain) and state[0] == plain[0]
                and isinstance(state[1], str) and state[1] in _BYTE_ORDERS
                and state[2:] == plain[2:]):
            raise _UnsupportedDtype(f"numpy.dtype {self.dtype} with the state {state!r}")
        self.dtype = self.dtype.newbyteorder(state[1])


def _plain_dtype(*args: Any) -> _PickledDtype:
    """Stands in for ``numpy.dtype`` while unpickling a header."""
    if not (len(args) == 3 and isinstance(args[0], str) and args[0] in _SUPPORTED_DTYPES
            and args[1:] == (False, True)):
        raise _UnsupportedDtype(f"numpy.dtype{args!r}")
    return _PickledDtype(_SUPPORTED_DTYPES[args[0]])


class _HeaderUnpickler(pickle.Unpickler):
    """Unpickles plain data (tuples, lists, dicts, str, numbers, None) and plain dtypes only."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("numpy", "dtype"):
            return _plain_dtype
        raise _RefusedGlobal(f"{module}.{name}")


def read_blosc(path: str | os.PathLike) -> np.ndarray | dict[str, np.ndarray]:
    """Reads a blosc file of the reference implementation without executing pickled code.

    Args:
      path: a ``.blosc`` file written by htc's ``compress_file`` or by `write_blosc`.

    Returns:
      The array, or a dict of arrays in the order they were stored.

    Raises:
      ValueError: naming the file, if it is not a valid blosc file, is truncated or corrupt, or its
        header refers to anything but plain data and ``numpy.dtype`` (the refused global is named).
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: is a directory, expected a .blosc file")
    data = path.read_bytes()
    header, offset = _read_header(path, data)
    chunks = memoryview(data)
    if isinstance(header, tuple):
        shape, dtype, _ = _array_entry(path, header, None)
        return _decompress(path, chunks[offset:], shape, dtype, None)
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the header is a {type(header).__name__}, expected a "
                         "(shape, dtype) tuple or a dict {key: (shape, dtype, compressed_nbytes)}")
    arrays = {}
    for key, entry in header.items():
        if not isinstance(key, str):
            raise ValueError(f"{path}: the header has the key {key!r}, expected str keys")
        shape, dtype, size = _array_entry(path, entry, key)
        if offset + size > len(data):
            raise ValueError(f"{path}: truncated: [{key!r}] needs {size} bytes at offset {offset}, "
                             f"the file has {len(data)} bytes")
        arrays[key] = _decompress(path, chunks[offset:offset + size], shape, dtype, key)
        offset += size
    if offset != len(data):
        raise ValueError(f"{path}: {len(data) - offset} bytes follow the last array")
    return arrays


def write_blosc(path: str | os.PathLike, data: np.ndarray | Mapping[str, np.ndarray]) -> None:
    """Writes an array or a dict of arrays in the reference's blosc format, atomically.

    Args:
      path: the file to write (its folder must exist).
      data: one array, or a mapping from str keys to arrays; arrays must have a bool or numeric
        dtype (either byte order) and at most ``blosc.MAX_BUFFERSIZE`` bytes each.
    """
    path = Path(path)
    if isinstance(data, Mapping):
        arrays = {_checked_key(path, key): _checked_array(path, array, key)
                  for key, array in data.items()}
        chunks = [_compress(array) for array in arrays.values()]
        header: Any = {key: (array.shape, array.dtype, len(chunk))
                       for (key, array), chunk in zip(arrays.items(), chunks, strict=True)}
    else:
        array = _checked_array(path, data, None)
        chunks = [_compress(array)]
        header = (array.shape, array.dtype)
    with atomic_write(path) as f:
        pickle.dump(header, f, protocol=_PICKLE_PROTOCOL)
        for chunk in chunks:
            f.write(chunk)


def read_annotations(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a segmentation file ``{annotation_name: uint8[H, W]}``.

    Raises:
      ValueError: naming the file (and key) if it is not a dict of 2-D uint8 masks.
    """
    masks = read_blosc(path)
    if not isinstance(masks, dict):
        raise ValueError(f"{path}: holds a single array, expected a dict of annotation masks")
    for name, mask in masks.items():
        _check_mask(path, name, mask)
    return masks


def write_annotations(path: str | os.PathLike, masks: Mapping[str, np.ndarray]) -> None:
    """Writes ``{annotation_name: uint8[H, W]}`` atomically (see `write_blosc`)."""
    for name, mask in masks.items():
        _check_mask(path, name, np.asarray(mask))
    write_blosc(path, masks)


def _read_header(path: Path, data: bytes) -> tuple[Any, int]:
    """Unpickles the header safely; returns it and the offset of the first chunk."""
    stream = io.BytesIO(data)
    try:
        header = _HeaderUnpickler(stream).load()
    except _RefusedGlobal as e:
        raise ValueError(f"{path}: refused: the header pickle refers to the global {e}; only "
                         "numpy.dtype of a bool or numeric type is allowed") from None
    except _UnsupportedDtype as e:
        raise ValueError(f"{path}: refused: the header pickle builds {e}; only bool and numeric "
                         f"dtypes are supported ({', '.join(_SUPPORTED_DTYPES)})") from None
    except Exception as e:  # a malformed pickle can raise almost any exception
        raise ValueError(f"{path}: not a blosc file, its header does not unpickle "
                         f"({type(e).__name__}: {e})") from None
    return header, stream.tell()


def _array_entry(path: Path, entry: Any, key: str | None) -> tuple[tuple[int, ...], np.dtype, int]:
    """Validates a header entry: ``(shape, dtype)`` for a single array (`key` None, size 0 is
    returned) or ``(shape, dtype, compressed_nbytes)`` for the array under `key` in a dict."""
    where = f"{path}" if key is None else f"{path} [{key!r}]"
    expected = "(shape, dtype)" if key is None else "(shape, dtype, compressed_nbytes)"
    if not (isinstance(entry, tuple | list) and len(entry) == expected.count(",") + 1):
        raise ValueError(f"{where}: the header entry is {entry!r}, expected {expected}")
    shape, dtype, *size = entry
    if not (isinstance(shape, tuple | list)
            and all(_is_int(n) and 0 <= n <= blosc.MAX_BUFFERSIZE for n in shape)):
        raise ValueError(f"{where}: the shape {shape!r} is not a tuple of non-negative ints")
    if not isinstance(dtype, _PickledDtype):
        raise ValueError(f"{where}: the dtype {dtype!r} is not a numpy.dtype")
    if size and not (_is_int(size[0]) and size[0] >= 0):
        raise ValueError(f"{where}: the compressed size {size[0]!r} is not a non-negative int")
    return tuple(shape), dtype.dtype, size[0] if size else 0


def _decompress(path: Path, chunk: memoryview, shape: tuple[int, ...], dtype: np.dtype,
                key: str | None) -> np.ndarray:
    """Decompresses one chunk into a new array after checking its sizes against the header."""
    where = f"{path}" if key is None else f"{path} [{key!r}]"
    if len(chunk) < _BLOSC_HEADER.size:
        raise ValueError(f"{where}: truncated: {len(chunk)} bytes of blosc data, shorter than "
                         f"a blosc header ({_BLOSC_HEADER.size} bytes)")
    nbytes, cbytes = _BLOSC_HEADER.unpack_from(chunk)[4::2]
    if cbytes != len(chunk):
        raise ValueError(f"{where}: corrupt or truncated: the blosc chunk says it has {cbytes} "
                         f"bytes, the file holds {len(chunk)}")
    expected = math.prod(shape) * dtype.itemsize
    if nbytes != expected:
        raise ValueError(f"{where}: the shape {shape} and dtype {dtype} need {expected} bytes, "
                         f"the blosc chunk decompresses to {nbytes}")
    array = np.empty(shape, dtype)
    if expected:
        try:
            blosc.decompress_ptr(chunk, array.ctypes.data)
        except blosc.blosc_extension.error as e:
            raise ValueError(f"{where}: corrupt blosc data ({e})") from None
    return array


def _compress(array: np.ndarray) -> bytes:
    return blosc.compress_ptr(array.ctypes.data, array.size, array.dtype.itemsize, **_COMPRESSION)


def _checked_key(path: Path, key: Any) -> str:
    if not isinstance(key, str):
        raise ValueError(f"{path}: the key {key!r} is not a str")
    return key


def _checked_array(path: Path, array: Any, key: str | None) -> np.ndarray:
    """The array as C-contiguous data of a supported dtype and size."""
    where = f"{path}" if key is None else f"{path} [{key!r}]"
    array = np.asarray(array, order="C")
    if array.dtype.newbyteorder("=") not in _SUPPORTED_DTYPES.values():
        raise ValueError(f"{where}: cannot store the dtype {array.dtype}; expected one of "
                         f"{', '.join(_SUPPORTED_DTYPES)}")
    if array.nbytes > blosc.MAX_BUFFERSIZE:
        raise ValueError(f"{where}: {array.nbytes} bytes exceed one blosc1 chunk "
                         f"({blosc.MAX_BUFFERSIZE} bytes)")
    return array


def _check_mask(path: str | os.PathLike, name: Any, mask: np.ndarray) -> None:
    if not isinstance(name, str):
        raise ValueError(f"{path}: the annotation name {name!r} is not a str")
    if mask.dtype != np.uint8 or mask.ndim != 2:
        raise ValueError(f"{path} [{name!r}]: an annotation must be a 2-D uint8 mask, got "
                         f"{mask.dtype} with shape {mask.shape}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
