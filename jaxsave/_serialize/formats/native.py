"""The default ``.jaxsave`` container: a JSON header and 64-byte-aligned raw arrays.

Layout (all integers little-endian)::

    0     8 bytes   magic b"\\x93JAXSAVE"
    8     8 bytes   uint64 H: length of the header, padded with spaces so that
                    the data starts at a multiple of 64
    16    4 bytes   uint32 CRC-32 of the header
    20    4 bytes   zero
    24    H bytes   UTF-8 JSON header, with "data_size"
    24+H            data: the arrays in leaf order, C order, each starting at the
                    next multiple of 64 bytes (zero padding in between)

Offsets are not stored: they follow from the leaves' shapes and dtypes, so a
file cannot point anywhere. The file size must be exactly ``24 + H + data_size``
with ``data_size`` the end of the last array. (Only the header is checksummed:
a CRC of the data would halve the loading speed.) Loading reads the arrays
in as few ``readinto`` calls as possible into one page-aligned buffer, so they
come back aligned (JAX then takes them without a copy on CPU).
"""

from __future__ import annotations

import json
import math
import operator
import os
import struct
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import repeat
from typing import Any, BinaryIO

import numpy as np

from jaxsave._core.dtypes import storage_dtype
from jaxsave._serialize.formats.base import MAX_HEADER_BYTES, Specs
from jaxsave.errors import FileFormatError

MAGIC = b"\x93JAXSAVE"
_PARALLEL_BYTES = 64 * 2**20  # reads this large use two threads
ALIGN = 64
_PREFIX = 24
_ZEROS = [b"\0" * n for n in range(ALIGN)]  # the padding before an array
_DIRECT_BYTES = 1 << 16  # arrays this large are written on their own, smaller ones gathered
_CHUNK_BYTES = 1 << 22


def _align(n: int, a: int = ALIGN) -> int:
    return -(-n // a) * a


def write(target: str | BinaryIO, header: dict[str, Any], arrays: Sequence[np.ndarray]) -> None:
    """Write ``header`` and the contiguous storable ``arrays`` to ``target``."""
    sizes = [a.nbytes for a in arrays]
    offsets = _layout(sizes)
    total = _total(offsets, sizes)
    text = json.dumps({**header, "data_size": total}, separators=(",", ":")).encode("utf-8")
    size = _align(_PREFIX + len(text)) - _PREFIX
    if isinstance(target, (str, os.PathLike)):
        with open(target, "wb", buffering=1 << 20) as f:
            _write_to(f, text, size, arrays, offsets, sizes)
    else:
        _write_to(target, text, size, arrays, offsets, sizes)


def _write_to(
    f: BinaryIO,
    text: bytes,
    size: int,
    arrays: Sequence[np.ndarray],
    offsets: Sequence[int],
    sizes: Sequence[int],
) -> None:
    text += b" " * (size - len(text))
    f.write(MAGIC + struct.pack("<QII", size, zlib.crc32(text), 0) + text)
    # Small arrays are gathered (with their padding) into chunks written at once:
    # one write per array costs more than the copy. Large ones are written as they are.
    chunk: list[Any] = []
    chunk_bytes = 0
    written = 0
    for a, offset, nbytes in zip(arrays, offsets, sizes):
        if offset > written:
            chunk.append(_ZEROS[offset - written])
        if nbytes >= _DIRECT_BYTES:
            if chunk:
                f.write(b"".join(chunk))
                chunk, chunk_bytes = [], 0
            f.write(a.reshape(-1).view(np.uint8))  # type: ignore[call-overload]
        elif nbytes:
            chunk.append(a)  # C-contiguous: join takes its buffer as it is
            chunk_bytes += nbytes
            if chunk_bytes >= _CHUNK_BYTES:
                f.write(b"".join(chunk))
                chunk, chunk_bytes = [], 0
        written = offset + nbytes
    if chunk:
        f.write(b"".join(chunk))


def _layout(sizes: Sequence[int]) -> list[int]:
    """The offset of each array: back to back, each aligned to 64 bytes.

    Sizes must be below 2**62 in total (the caller checks against the file size).
    """
    if not sizes:
        return []
    aligned = (np.asarray(sizes, np.int64) + (ALIGN - 1)) & -ALIGN
    offsets = np.zeros(len(sizes), np.int64)
    np.cumsum(aligned[:-1], out=offsets[1:])
    return offsets.tolist()  # type: ignore[no-any-return]


_first, _second = operator.itemgetter(0), operator.itemgetter(1)


def _total(offsets: Sequence[int], sizes: Sequence[int]) -> int:
    return offsets[-1] + sizes[-1] if sizes else 0


def _aligned_buffer(nbytes: int) -> np.ndarray:
    raw = np.empty(nbytes + 4096, np.uint8)
    start = (-raw.ctypes.data) % 4096
    return raw[start : start + nbytes]


class Reader:
    """Read a ``.jaxsave`` file's header and, on demand, its arrays."""

    def __init__(self, target: str | BinaryIO):
        self._own = isinstance(target, (str, os.PathLike))
        self._f: BinaryIO = open(target, "rb", buffering=0) if self._own else target  # type: ignore[assignment, arg-type]  # noqa: SIM115
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
        hlen, crc, _ = struct.unpack("<QII", prefix[8:])
        if hlen > MAX_HEADER_BYTES or hlen > size - _PREFIX:
            raise FileFormatError(f"header length {hlen} exceeds the limit or the file size")
        text = f.read(hlen)
        if len(text) != hlen:
            raise FileFormatError("the file is truncated inside its header")
        if zlib.crc32(text) != crc:
            raise FileFormatError("the header's checksum does not match (corrupt file)")
        try:
            header = json.loads(text)
        except (ValueError, RecursionError) as e:
            raise FileFormatError(f"the header is not valid JSON: {e}") from None
        if not isinstance(header, dict):
            raise FileFormatError("the header is not a JSON object")
        self._data_start = self._start + _PREFIX + hlen
        self._data_size = size - _PREFIX - hlen
        self._offsets: list[int] = []
        self._sizes: list[int] = []
        return header

    def check_arrays(self, specs: Specs, names: Sequence[str] = ()) -> None:
        """Lay the arrays out from their (validated) shapes and dtypes; check the file size."""
        dtypes = list(map(_second, specs))
        itemsize = {dtype: storage_dtype(dtype).itemsize for dtype in dict.fromkeys(dtypes)}
        sizes = list(map(operator.mul, map(math.prod, map(_first, specs)), map(itemsize.__getitem__, dtypes)))
        declared = self.header.get("data_size")
        offsets: list[int] = []
        if sum(sizes) > self._data_size:  # too large for the file (and maybe for int64)
            total = 0
            for n in sizes:
                total = _align(total) + n
        else:
            offsets = _layout(sizes)
            total = _total(offsets, sizes)
        if total != self._data_size or declared != total:
            raise FileFormatError(
                f"the arrays' shapes and dtypes need {total} data bytes, the file has "
                f"{self._data_size} and its header says {declared!r} (truncated or corrupt)"
            )
        self._offsets, self._sizes = offsets, sizes

    def read(self, indices: Sequence[int], specs: Specs, names: Sequence[str] = ()) -> list[np.ndarray]:
        """The storable arrays ``indices`` (shapes/dtypes from ``specs``, checked).

        The arrays contiguous in the file are read at once, into one buffer: a
        whole file is one read, and the arrays are views of that buffer.
        """
        offsets, sizes = self._offsets, self._sizes
        order = sorted(set(indices))  # offsets grow with the index
        if order and order[-1] - order[0] + 1 == len(order):  # one run (a whole file)
            runs = [order]
        else:
            runs = []  # groups of arrays that are contiguous in the file
            end = -1
            for i in order:
                if offsets[i] != end:
                    runs.append([])
                runs[-1].append(i)
                end = _align(offsets[i] + sizes[i])
        spans = [(offsets[r[0]], offsets[r[-1]] + sizes[r[-1]]) for r in runs]
        buf = _aligned_buffer(sum(_align(b - a) for a, b in spans))
        out: list[np.ndarray] = []
        pos = 0
        for run, (first, last) in zip(runs, spans):
            self._readinto(self._data_start + first, buf[pos : pos + last - first])
            # The views, made at C speed (one np.ndarray(shape, dtype, buffer, offset) each).
            if len(run) == run[-1] - run[0] + 1:
                sub, at = specs[run[0] : run[-1] + 1], offsets[run[0] : run[-1] + 1]
            else:
                sub, at = [specs[i] for i in run], [offsets[i] for i in run]
            dtypes = list(map(_second, sub))
            stores = {dtype: storage_dtype(dtype) for dtype in dict.fromkeys(dtypes)}
            out += map(
                np.ndarray,
                map(_first, sub),
                map(stores.__getitem__, dtypes),
                repeat(buf),
                map(operator.add, at, repeat(pos - first)),
            )
            pos += _align(last - first)
        if len(indices) == len(order) and (not order or indices[0] == order[0]) and list(indices) == order:
            return out  # the usual case: asked for in file order
        found = dict(zip(order, out))
        return [found[i] for i in indices]

    def _readinto(self, offset: int, view: np.ndarray) -> None:
        mv = memoryview(view)  # type: ignore[arg-type]
        if self._own and len(mv) >= _PARALLEL_BYTES:
            # Two threads: copying out of the page cache (and faulting in fresh pages)
            # is CPU-bound, and preadv releases the GIL.
            half = _align(len(mv) // 2, 4096)
            with ThreadPoolExecutor(2) as pool:
                done = list(
                    pool.map(
                        lambda part: self._pread(offset + part[0], mv[part[0] : part[1]]),
                        [(0, half), (half, len(mv))],
                    )
                )
            del done
            return
        self._f.seek(offset)
        got = 0
        while got < len(mv):
            n = self._f.readinto(mv[got:])  # type: ignore[attr-defined]
            if not n:
                raise FileFormatError("the file ended before its data did (truncated?)")
            got += n

    def _pread(self, offset: int, mv: memoryview) -> None:
        fd, got = self._f.fileno(), 0
        while got < len(mv):
            n = os.preadv(fd, [mv[got:]], offset + got)
            if not n:
                raise FileFormatError("the file ended before its data did (truncated?)")
            got += n

    def close(self) -> None:
        if self._own:
            self._f.close()
