"""The default ``.jaxsave`` container: a JSON header and 64-byte-aligned raw arrays.

Layout (all integers little-endian)::

    0     8 bytes   magic b"\\x93JAXSAVE"
    8     8 bytes   uint64 H: length of the header, padded with spaces so that
                    the data starts at a multiple of 64
    16    H bytes   UTF-8 JSON header; "data": [[offset, nbytes], ...] per array
                    (offsets from the data start, multiples of 64), "data_size"
    16+H            data: the arrays, C order, back to back with zero padding

The file size must be exactly ``16 + H + data_size``. Loading reads the arrays
in as few ``readinto`` calls as possible into one page-aligned buffer, so they
come back aligned (JAX then takes them without a copy on CPU).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Sequence
from typing import Any, BinaryIO

import numpy as np

from jaxsave._dtypes import storage_dtype
from jaxsave._formats import MAX_HEADER_BYTES
from jaxsave.errors import FileFormatError

MAGIC = b"\x93JAXSAVE"
ALIGN = 64
_PREFIX = 16


def _align(n: int, a: int = ALIGN) -> int:
    return -(-n // a) * a


def write(target: str | BinaryIO, header: dict[str, Any], arrays: Sequence[np.ndarray]) -> None:
    """Write ``header`` and the contiguous storable ``arrays`` to ``target``."""
    data, pos = [], 0
    for a in arrays:
        pos = _align(pos)
        data.append([pos, a.nbytes])
        pos += a.nbytes
    text = json.dumps({**header, "data": data, "data_size": pos},
                      separators=(",", ":")).encode("utf-8")
    size = _align(_PREFIX + len(text)) - _PREFIX
    if isinstance(target, (str, os.PathLike)):
        with open(target, "wb", buffering=1 << 20) as f:
            _write_to(f, text, size, arrays, data)
    else:
        _write_to(target, text, size, arrays, data)


def _write_to(f: BinaryIO, text: bytes, size: int, arrays: Sequence[np.ndarray],
              data: list[list[int]]) -> None:
    f.write(MAGIC + struct.pack("<Q", size) + text + b" " * (size - len(text)))
    written = 0
    for a, (offset, nbytes) in zip(arrays, data):
        if offset > written:
            f.write(b"\0" * (offset - written))
        if nbytes:
            f.write(a.reshape(-1).view(np.uint8))
        written = offset + nbytes


def _aligned_buffer(nbytes: int) -> np.ndarray:
    raw = np.empty(nbytes + 4096, np.uint8)
    start = (-raw.ctypes.data) % 4096
    return raw[start:start + nbytes]


class Reader:
    """Read a ``.jaxsave`` file's header and, on demand, its arrays."""

    def __init__(self, target: str | BinaryIO):
        self._own = isinstance(target, (str, os.PathLike))
        self._f: BinaryIO = open(target, "rb", buffering=0) if self._own else target  # type: ignore[assignment]
        try:
            self._start = self._f.tell() if not self._own else 0
            self.header = self._read_header()
        except BaseException:
            self.close()
            raise

    def _read_header(self) -> dict[str, Any]:
        f = self._f
        end = f.seek(0, os.SEEK_END)
        f.seek(self._start)
        size = end - self._start
        prefix = f.read(_PREFIX)
        if len(prefix) < _PREFIX or not prefix.startswith(MAGIC):
            raise FileFormatError("not a .jaxsave file (bad magic or truncated)")
        (hlen,) = struct.unpack("<Q", prefix[8:])
        if hlen > MAX_HEADER_BYTES or hlen > size - _PREFIX:
            raise FileFormatError(f"header length {hlen} exceeds the limit or the file size")
        text = f.read(hlen)
        if len(text) != hlen:
            raise FileFormatError("the file is truncated inside its header")
        try:
            header = json.loads(text)
        except (ValueError, RecursionError) as e:
            raise FileFormatError(f"the header is not valid JSON: {e}") from None
        if not isinstance(header, dict):
            raise FileFormatError("the header is not a JSON object")
        self._data_start = self._start + _PREFIX + hlen
        data, total = header.get("data"), header.get("data_size")
        if not isinstance(total, int) or total != size - _PREFIX - hlen:
            raise FileFormatError(
                f"the file has {size - _PREFIX - hlen} data bytes, the header says {total!r} "
                "(truncated or corrupt)")
        if not isinstance(data, list) or not all(
            isinstance(d, list) and len(d) == 2 and all(type(x) is int for x in d) for d in data
        ):
            raise FileFormatError("the header's data table is malformed")
        for offset, nbytes in data:
            if offset < 0 or nbytes < 0 or offset % ALIGN or offset + nbytes > total:
                raise FileFormatError(f"array data [{offset}, +{nbytes}) lies outside the file")
        self._data: list[list[int]] = data
        return header

    def check_arrays(self, specs: Sequence[tuple[tuple[int, ...], str]],
                     names: Sequence[str] = ()) -> None:
        """Check that each array's byte count matches its (validated) shape and dtype."""
        if len(specs) != len(self._data):
            raise FileFormatError(f"{len(specs)} leaves but {len(self._data)} data entries")
        for i, ((shape, dtype), (_, nbytes)) in enumerate(zip(specs, self._data)):
            want = int(np.prod(shape, dtype=object)) * storage_dtype(dtype).itemsize
            if want != nbytes:
                raise FileFormatError(f"array {i} has {nbytes} bytes, its shape and dtype need {want}")

    def read(self, indices: Sequence[int], specs: Sequence[tuple[tuple[int, ...], str]],
             names: Sequence[str] = ()) -> list[np.ndarray]:
        """The storable arrays ``indices`` (shapes/dtypes from ``specs``, checked)."""
        order = sorted(set(indices), key=lambda i: self._data[i][0])
        runs: list[list[int]] = []  # contiguous groups of arrays in file order
        for i in order:
            if runs and self._data[i][0] == _align(self._end(runs[-1][-1])):
                runs[-1].append(i)
            else:
                runs.append([i])
        total = sum(_align(self._end(r[-1]) - self._data[r[0]][0]) for r in runs)
        buf = _aligned_buffer(total)
        out: dict[int, np.ndarray] = {}
        pos = 0
        for run in runs:
            first = self._data[run[0]][0]
            span = self._end(run[-1]) - first
            self._readinto(self._data_start + first, buf[pos:pos + span])
            for i in run:
                offset, nbytes = self._data[i]
                shape, dtype = specs[i]
                start = pos + offset - first
                out[i] = buf[start:start + nbytes].view(storage_dtype(dtype)).reshape(shape)
            pos += _align(span)
        return [out[i] for i in indices]

    def _end(self, i: int) -> int:
        return self._data[i][0] + self._data[i][1]

    def _readinto(self, offset: int, view: np.ndarray) -> None:
        mv = memoryview(view)
        self._f.seek(offset)
        got = 0
        while got < len(mv):
            n = self._f.readinto(mv[got:])
            if not n:
                raise FileFormatError("the file ended before its data did (truncated?)")
            got += n

    def close(self) -> None:
        if self._own:
            self._f.close()
