"""``.npz``: a zip of ``.npy`` arrays (written and read with ``numpy.lib.format``).

Entries are named by the leaves' readable key paths (``params.dense.kernel.npy``)
and the jaxsave header is the zip member ``__jaxsave__.json``, which
``np.load(f)["__jaxsave__.json"]`` returns as bytes. ml_dtypes arrays and PRNG
keys are stored as unsigned views / key data (see :mod:`jaxsave._core.dtypes`).

Reading checks each member's ``.npy`` header (no object dtypes, no pickles, a
byte count that matches the member's size) before allocating anything. An
``.npz`` written by ``np.savez`` loads as a flat dict of arrays.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Sequence
from typing import Any, BinaryIO

import numpy as np
from numpy.lib import format as npformat

from jaxsave._core.dtypes import dtype_from_name, storage_dtype
from jaxsave._serialize.formats.base import MAX_HEADER_BYTES, Specs, check_names_storable
from jaxsave.errors import FileFormatError

HEADER_MEMBER = "__jaxsave__.json"


def write(target: str | BinaryIO, header: dict[str, Any], arrays: Sequence[np.ndarray]) -> None:
    check_names_storable(header["leaves"]["names"], ".npz")
    text = json.dumps(header, separators=(",", ":"))
    with zipfile.ZipFile(target, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, a in zip(header["leaves"]["names"], arrays):
            with zf.open(name + ".npy", "w", force_zip64=True) as fp:
                npformat.write_array(fp, a, allow_pickle=False)
        zf.writestr(HEADER_MEMBER, text)


class Reader:
    """Read a ``.npz``, validating every member before allocating its array."""

    def __init__(self, target: str | BinaryIO):
        try:
            self._zip = zipfile.ZipFile(target, "r")
        except (zipfile.BadZipFile, OSError, ValueError) as e:
            raise FileFormatError(f"not a readable .npz (zip) file: {e}") from None
        self.header = None
        fp = self._zip.fp
        self._size = fp.seek(0, os.SEEK_END) if fp is not None else 0
        try:
            info = self._zip.getinfo(HEADER_MEMBER)
        except KeyError:
            return
        if info.file_size > MAX_HEADER_BYTES:
            raise FileFormatError(f"{HEADER_MEMBER} exceeds {MAX_HEADER_BYTES} bytes")
        try:
            with self._zip.open(info) as fp:
                self.header = json.loads(fp.read(MAX_HEADER_BYTES + 1))
        except (ValueError, RecursionError, zipfile.BadZipFile) as e:
            raise FileFormatError(f"{HEADER_MEMBER} is not valid JSON: {e}") from None

    def foreign_specs(self) -> list[tuple[str, tuple[int, ...], str]]:
        out = []
        for info in self._zip.infolist():
            if not info.filename.endswith(".npy"):
                continue
            with self._zip.open(info) as fp:
                shape, dtype, _ = self._npy_header(fp, info)
            try:
                name = dtype_from_name(dtype.name).name
            except FileFormatError:
                raise FileFormatError(
                    f"member {info.filename!r} has dtype {dtype}, which jaxsave does not load "
                    "(object arrays would need pickle)"
                ) from None
            out.append((info.filename[:-4], shape, name))
        return out

    def _npy_header(self, fp: Any, info: zipfile.ZipInfo) -> tuple[tuple[int, ...], np.dtype, int]:
        stored = info.compress_type == zipfile.ZIP_STORED
        if info.header_offset + info.compress_size > self._size or (
            info.file_size != info.compress_size
            if stored
            else info.file_size > 1100 * info.compress_size + 4096  # beyond deflate's ratio
        ):
            raise FileFormatError(f"member {info.filename!r} has impossible sizes (zip bomb?)")
        try:
            version = npformat.read_magic(fp)
            if version == (1, 0):
                shape, fortran, dtype = npformat.read_array_header_1_0(fp)
            elif version == (2, 0):
                shape, fortran, dtype = npformat.read_array_header_2_0(fp)
            else:
                raise ValueError(f"unsupported .npy version {version}")
        except (ValueError, SyntaxError, OSError, zipfile.BadZipFile) as e:
            raise FileFormatError(f"member {info.filename!r}: bad .npy header: {e}") from None
        if dtype.hasobject:
            raise FileFormatError(f"member {info.filename!r} is an object array; jaxsave never unpickles")
        if fortran and len(shape) > 1:
            raise FileFormatError(f"member {info.filename!r} is in Fortran order")
        nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
        if nbytes != info.file_size - fp.tell():
            raise FileFormatError(
                f"member {info.filename!r}: its header promises {nbytes} bytes, "
                f"it holds {info.file_size - fp.tell()}"
            )
        return tuple(shape), dtype, nbytes

    def check_arrays(self, specs: Specs, names: Sequence[str]) -> None:
        for name in names:
            if name + ".npy" not in self._zip.NameToInfo:
                raise FileFormatError(f"the .npz has no member {name + '.npy'!r}")

    def read(self, indices: Sequence[int], specs: Specs, names: Sequence[str]) -> list[np.ndarray]:
        out = []
        for i in indices:
            info = self._zip.getinfo(names[i] + ".npy")
            shape, want = tuple(specs[i][0]), storage_dtype(specs[i][1])
            try:
                with self._zip.open(info) as fp:
                    got_shape, dtype, nbytes = self._npy_header(fp, info)
                    if got_shape != shape or dtype != want:
                        raise FileFormatError(
                            f"member {info.filename!r} is {dtype}{list(got_shape)}, "
                            f"the header says {want}{list(shape)}"
                        )
                    arr = np.empty(shape, dtype)
                    view = memoryview(arr.reshape(-1).view(np.uint8))  # type: ignore[arg-type]
                    got = 0
                    while got < nbytes:
                        n = fp.readinto(view[got:])  # type: ignore[attr-defined]
                        if not n:
                            raise FileFormatError(f"member {info.filename!r} is truncated")
                        got += n
            except (zipfile.BadZipFile, OSError) as e:
                raise FileFormatError(f"member {info.filename!r} is corrupt: {e}") from None
            out.append(arr)
        return out

    def close(self) -> None:
        self._zip.close()
