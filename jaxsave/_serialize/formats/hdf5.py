"""``.h5``/``.hdf5``: one dataset per array leaf under ``/arrays``, the header as an attribute.

Datasets are named by the leaves' readable key paths (``params.dense.kernel``),
so the file browses well in HDFView or h5py; the jaxsave header is the JSON
string attribute ``jaxsave`` of the root group. A file whose data is not all
inside it (external storage, external or soft links, virtual datasets) or that
uses a filter jaxsave does not write is refused before anything is read
(:mod:`jaxsave._store.hdf5.trust`); beyond that, safety on untrusted files rests on
the HDF5 library's own parsing: prefer the default format for those.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any, BinaryIO

import h5py
import numpy as np

from jaxsave._core.diskspace import check_room
from jaxsave._core.dtypes import storage_dtype
from jaxsave._serialize.formats.base import MAX_HEADER_BYTES, Specs, check_names_storable
from jaxsave._serialize.leaf_table import suffixed
from jaxsave._store import schema
from jaxsave._store.hdf5.trust import check_file, stored_bytes
from jaxsave.errors import FileFormatError

GROUP = "arrays"


def _dataset_names(names: Sequence[str]) -> list[str]:
    """The leaves' dataset names: their own, but ``leaf_{i}`` (with a ``~n`` suffix if another
    leaf has that name) for names HDF5 cannot take.

    >>> _dataset_names(["..", "leaf_0", "a"])
    ['leaf_0~1', 'leaf_0', 'a']
    """
    taken, out = set(names), []
    for i, name in enumerate(names):
        if name in ("", ".", ".."):
            name = f"leaf_{i}"
            name = suffixed(name, taken)[0] if name in taken else name
            taken.add(name)
        out.append(name)
    return out


def write(target: str | BinaryIO, header: dict[str, Any], arrays: Sequence[np.ndarray]) -> None:
    check_names_storable(header["leaves"]["names"], "HDF5")
    if isinstance(target, (str, os.PathLike)):  # HDF5 cannot recover from a full disk: check first
        check_room(os.fspath(target), sum(a.nbytes for a in arrays) + 4096 * (len(arrays) + 1))
    with h5py.File(target, "w") as f:
        f.attrs["jaxsave"] = json.dumps(header, separators=(",", ":"))
        group = f.create_group(GROUP)
        for name, a in zip(_dataset_names(header["leaves"]["names"]), arrays):
            group.create_dataset(name, data=a)


def check_stored(ds: h5py.Dataset, nbytes: int, slack: int = 2**26) -> None:
    """Refuse to read ``nbytes`` from ``ds`` when the file does not hold data for them.

    An HDF5 dataset can declare any shape and store nothing (unallocated chunks
    read as the fill value), so a small hostile file could make a reader
    allocate terabytes. The bytes read must be backed by stored bytes (times
    the filters' expansion, the sources' for a merged file's virtual dataset:
    see :func:`jaxsave._store.hdf5.trust.stored_bytes`), plus ``slack`` bytes.
    """
    stored = stored_bytes(ds)
    if nbytes > stored + slack:
        raise FileFormatError(
            f"dataset {ds.name!r} declares {nbytes} bytes to read but the file stores only "
            f"{stored} for it (a sparse or hostile file)"
        )


class Reader:
    """Read a jaxsave HDF5 file."""

    def __init__(self, target: str | BinaryIO):
        self._names_of: Sequence[str] | None = None
        self._dataset_names: list[str] = []
        try:
            self._f = h5py.File(target, "r")
        except OSError as e:
            raise FileFormatError(f"not a readable HDF5 file: {e}") from None
        try:
            check_file(self._f, "the HDF5 file")  # before any data is read: nothing from outside it
        except BaseException:
            self._f.close()
            raise
        raw = self._f.attrs.get("jaxsave")
        if raw is None:
            samples = schema.FORMAT in self._f.attrs
            self._f.close()
            name = target if isinstance(target, str) else getattr(target, "name", "the file")
            if samples:
                raise FileFormatError(
                    f"{name!r} is a jaxsave sample file (the samples of a run), not a saved "
                    "pytree: read it with jaxsave.load_samples"
                )
            raise FileFormatError(
                f"{name!r} is an HDF5 file without a jaxsave header (not written by jaxsave)"
            )
        if isinstance(raw, bytes):
            raw = raw.decode("utf-8", "replace")
        if not isinstance(raw, str) or len(raw) > MAX_HEADER_BYTES:
            raise FileFormatError("the jaxsave header attribute is malformed or too large")
        try:
            self.header = json.loads(raw)
        except (ValueError, RecursionError) as e:
            raise FileFormatError(f"the jaxsave header is not valid JSON: {e}") from None

    def _dataset(self, names: Sequence[str], i: int) -> Any:
        if self._names_of is not names:  # the same list for every leaf of a file: mapped once
            self._names_of, self._dataset_names = names, _dataset_names(names)
        ds = self._f.get(f"{GROUP}/{self._dataset_names[i]}")
        if not isinstance(ds, h5py.Dataset):
            raise FileFormatError(f"the HDF5 file has no dataset for leaf {names[i]!r}")
        return ds

    def check_arrays(self, specs: Specs, names: Sequence[str]) -> None:
        for i, (shape, dtype) in enumerate(specs):
            ds = self._dataset(names, i)
            if tuple(ds.shape) != tuple(shape) or ds.dtype != storage_dtype(dtype):
                raise FileFormatError(
                    f"dataset {ds.name!r} is {ds.dtype}{list(ds.shape)}, the header says {dtype}{list(shape)}"
                )
            check_stored(ds, int(np.prod(shape, dtype=object)) * ds.dtype.itemsize)

    def read(self, indices: Sequence[int], specs: Specs, names: Sequence[str]) -> list[np.ndarray]:
        out = []
        for i in indices:
            ds = self._dataset(names, i)
            arr = np.empty(specs[i][0], storage_dtype(specs[i][1]))
            if arr.size:
                ds.read_direct(arr)
            out.append(arr)
        return out

    def close(self) -> None:
        self._f.close()
