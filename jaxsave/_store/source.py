"""A sample source for the readers: an HDF5 file or a Zarr store, behind one interface.

:func:`open_source` is the one place that decides which backend a path (or URL, or
store object) is (:func:`jaxsave._store.location.is_zarr`); :mod:`jaxsave.samples`
reads through the :class:`SampleSource` it yields and never asks again.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np

from jaxsave._store import schema
from jaxsave._store.hdf5 import superblock
from jaxsave._store.hdf5.sample_file import (
    attr_str,
    has_structure,
    leaf_dataset,
    open_sample_file,
    read_counts,
    read_layout,
    read_structure,
    read_variables,
)
from jaxsave._store.hdf5.trust import stored_bytes
from jaxsave._store.location import check_storage_options, is_zarr
from jaxsave._store.schema import VariableInfo


class LeafArray(Protocol):
    """One stored leaf: ``h5py.Dataset`` and the Zarr reader's leaf have these."""

    name: Any
    shape: tuple[int, ...]
    dtype: np.dtype
    ndim: int

    def __getitem__(self, selection: Any) -> np.ndarray: ...

    def read_direct(self, out: np.ndarray, source: Any, dest: Any = None) -> None: ...


class SampleSource(Protocol):
    """What the readers need of an open sample file or store."""

    path: str

    def layout(self) -> str: ...

    def has_structure(self) -> bool: ...

    def structure(self) -> str: ...

    def variables(self) -> list[VariableInfo]: ...

    def counts(self) -> np.ndarray: ...

    def dataset(self, layout: str, var: VariableInfo, chain: int | None = None) -> Any: ...

    def stored_bytes(self, ds: Any) -> int:
        """The most bytes a read of ``ds`` can produce from stored data (not the fill value)."""
        ...

    def info(self) -> dict[str, Any]: ...


class HDF5Source:
    """An HDF5 sample file opened by :func:`jaxsave._store.hdf5.sample_file.open_sample_file`."""

    def __init__(self, f: Any, path: str):
        self.f, self.path = f, path

    def layout(self) -> str:
        return read_layout(self.f)

    def has_structure(self) -> bool:
        return has_structure(self.f)

    def structure(self) -> str:
        return read_structure(self.f)

    def variables(self) -> list[VariableInfo]:
        return read_variables(self.f)

    def counts(self) -> np.ndarray:
        return read_counts(self.f)

    def dataset(self, layout: str, var: VariableInfo, chain: int | None = None) -> Any:
        return leaf_dataset(self.f, layout, var, chain)

    def stored_bytes(self, ds: Any) -> int:
        return stored_bytes(ds)

    def info(self) -> dict[str, Any]:
        attrs = self.f.attrs
        return {
            "format": int(attrs[schema.FORMAT]),
            "version": attr_str(attrs.get(schema.VERSION, "?")),
            "created": attr_str(attrs.get(schema.CREATED, "?")),
            "open_for_writing": superblock.open_flags(self.path) != 0,
        }


@contextlib.contextmanager
def open_source(source: Any, storage_options: dict | None = None) -> Iterator[SampleSource]:
    """Open a sample file (HDF5) or store (Zarr) for reading; see :mod:`jaxsave._store.location`.

    ``storage_options`` (fsspec's, for a store named by URL) with an HDF5 file is a ``TypeError``."""
    check_storage_options(source, storage_options)
    if is_zarr(source):
        from jaxsave._store.zarr.sample_store import open_sample_store

        with open_sample_store(source, storage_options) as store:
            yield store
        return
    path = os.fspath(source)
    with open_sample_file(path) as f:
        yield HDF5Source(f, path)
