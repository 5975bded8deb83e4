"""The HDF5 sample file, read side: open it safely, check its header, read its schema.

Every name comes from :mod:`jaxsave._store.schema`; this module only knows how HDF5
holds them. Readers (:mod:`jaxsave.samples`), :func:`jaxsave.merge` and the CLI open
files through :func:`open_sample_file`.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from typing import Any

import h5py
import numpy as np

from jaxsave._core import dtypes as _dtypes
from jaxsave._store import schema
from jaxsave._store.hdf5 import superblock as _superblock
from jaxsave._store.hdf5.trust import check_file
from jaxsave._store.schema import VariableInfo
from jaxsave.errors import FileFormatError, JaxsaveError

PathLike = str | os.PathLike

#: How long a reader retries an open that fails while the file changes under it
#: (see :func:`open_sample_file`).
OPEN_RETRY_S = 5.0
_BUSY = ("already open for write", "unable to lock file")


def _identity(path: str) -> tuple[int, ...] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _open_file(path: str) -> h5py.File:
    """Open a sample file for reading once; every failure becomes a :class:`FileFormatError`.

    A file still marked open for writing (a running or killed SWMR writer) is
    opened in SWMR read mode, others normally. A file shorter than its
    superblock says is refused up front: SWMR readers would wait for the
    missing bytes forever.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file: {path!r}")
    try:
        flags, eof = _superblock.open_flags(path), _superblock.stored_eof(path)
        if eof is not None and eof > os.path.getsize(path):
            raise FileFormatError(f"truncated: {os.path.getsize(path)} bytes, the superblock says {eof}")
        return h5py.File(path, "r", **({"libver": "latest", "swmr": True} if flags else {}))
    except (OSError, ValueError, RuntimeError) as error:
        raise FileFormatError(
            f"{path!r} cannot be opened as an HDF5 file (truncated, corrupt or not HDF5): {error}"
        ) from error


def open_retrying(path: str) -> h5py.File:
    """:func:`_open_file`, retried while a writer swaps or reopens the file (:data:`OPEN_RETRY_S`).

    A writer replaces the file by a rename and reopens it for SWMR writing; a
    reader that looks at the file's flags just before and opens it just after
    (or meets HDF5's lock of the opening writer) fails for a moment. Such a
    failure, or one during which the file changed, is retried; others are not.
    """
    delay, deadline = 0.001, time.monotonic() + OPEN_RETRY_S
    while True:
        before = _identity(path)
        try:
            return _open_file(path)
        except FileFormatError as error:
            transient = any(b in str(error) for b in _BUSY) or _identity(path) != before
            if not transient:
                raise
            if time.monotonic() > deadline:
                raise FileFormatError(
                    f"{error} (still after retrying for {OPEN_RETRY_S:g} s: a writer that is not "
                    "SWMR holds it, or it keeps changing)"
                ) from error
        time.sleep(delay)
        delay = min(2 * delay, 0.05)


@contextlib.contextmanager
def open_sample_file(path: PathLike) -> Iterator[h5py.File]:
    """Open a sample file for reading (:func:`open_retrying`) and check its header.

    Every failure becomes a :class:`FileFormatError`.
    """
    path = os.fspath(path)
    f = open_retrying(path)
    try:
        check_header(f, path)
        yield f
    except JaxsaveError:
        raise
    except (OSError, RuntimeError, KeyError, ValueError, TypeError) as error:
        raise FileFormatError(f"{path!r} is damaged or not a valid jaxsave file: {error}") from error
    finally:
        f.close()


def check_header(f: h5py.File, path: str, *, merged: bool = True, where: str = "") -> None:
    """Refuse a file that is not a sample file this jaxsave can read: one of a newer format, of
    an unknown layout, or with data outside it (but a ``merged`` file's sources). ``where``
    names the file in the messages (its path by default)."""
    where = where or repr(path)
    fmt = f.attrs.get(schema.FORMAT)
    if fmt is None:
        raise FileFormatError(f"{where} is an HDF5 file but not a jaxsave sample file (no {schema.FORMAT!r})")
    schema.checked_format(fmt, where)
    if attr_str(f.attrs.get(schema.LAYOUT, "")) not in schema.LAYOUTS:
        raise FileFormatError(f"{where} has an unknown layout {f.attrs.get(schema.LAYOUT)!r}")
    check_file(f, where, merged=merged)  # no data from outside the file


def attr_str(value: Any) -> str:
    """A string attribute as ``str`` (h5py gives ``bytes`` for some)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def read_layout(f: h5py.File) -> str:
    """The file's layout (:data:`schema.LAYOUTS`; checked by :func:`check_header`)."""
    return attr_str(f.attrs[schema.LAYOUT])


def read_structure(f: h5py.File) -> str:
    """The JSON text of the file's structure attribute."""
    return attr_str(f.attrs[schema.STRUCTURE])


def has_structure(f: h5py.File) -> bool:
    """Whether a chain was registered (the file describes its leaves)."""
    return schema.STRUCTURE in f.attrs


def read_variables(f: h5py.File) -> list[VariableInfo]:
    """The leaves the file's structure attribute describes (dtype names checked)."""
    raw = f.attrs.get(schema.STRUCTURE)
    if raw is None:
        raise FileFormatError(f"{f.filename!r} holds no samples yet (no chain was registered)")
    try:
        out = schema.parse_structure(attr_str(raw))
    except (ValueError, KeyError, TypeError) as error:
        raise FileFormatError(
            f"{f.filename!r}: its {schema.STRUCTURE!r} attribute is malformed: {error}"
        ) from error
    for v in out:
        _dtypes.storage_dtype(v.dtype)  # whitelisted dtype names only
    return out


def read_counts(f: h5py.File) -> np.ndarray:
    """Each chain's sample count (int64, checked: :func:`jaxsave._store.schema.checked_counts`)."""
    return schema.checked_counts(f.attrs.get(schema.COUNTS, np.zeros(0, np.int64)), repr(f.filename))


def leaf_dataset(f: h5py.File, layout: str, var: VariableInfo, chain: int | None = None) -> h5py.Dataset:
    """The dataset of leaf ``var`` (of chain ``chain`` in layout ``"chains"``)."""
    path = schema.dataset_path(layout, var, chain)
    ds = f.get(path)
    if not isinstance(ds, h5py.Dataset):
        raise FileFormatError(f"{f.filename!r} lacks the dataset {path!r}")
    return ds


def write_root_attributes(attrs: h5py.AttributeManager, layout: str) -> None:
    """Set :func:`schema.root_attributes`, and those of a new file where they are missing."""
    for k, v in schema.root_attributes(layout).items():
        attrs[k] = v
    for k, v in schema.new_file_attributes().items():
        if k not in attrs:
            attrs[k] = v


def root_attributes_stale(attrs: h5py.AttributeManager, layout: str) -> bool:
    """Whether :func:`write_root_attributes` would change anything."""
    return any(k not in attrs for k in schema.new_file_attributes()) or any(
        k not in attrs or attrs[k] != v for k, v in schema.root_attributes(layout).items()
    )


def create_scales(
    group: h5py.Group, chains: int, draws: int, *, resizable: bool = False
) -> dict[str, h5py.Dataset]:
    """The ``chain`` and ``draw`` dimension scales of a group (layout ``"posterior"``), by name.

    ``resizable`` scales are chunked (at most 4096 entries a chunk) and can grow with
    the datasets.
    """
    scales = {}
    for name, size in ((schema.CHAIN_DIM, chains), (schema.DRAW_DIM, draws)):
        options: dict[str, Any] = {}
        if resizable:
            options = {"maxshape": (None,), "chunks": (max(1, min(size, 4096)),)}
        scales[name] = group.create_dataset(name, data=np.arange(size, dtype=np.int64), **options)
        scales[name].make_scale(name)
    return scales


def attach_scales(
    group: h5py.Group, ds: h5py.Dataset, name: str, scales: dict[str, h5py.Dataset] | None = None
) -> None:
    """Attach ``chain``, ``draw`` and ``{name}_dim_{k}`` (created if missing) to ``ds``.

    ``scales``: the group's scales by name, as :func:`create_scales` returns them; the others
    are looked up in ``group``, and the dimensions created here are added (each h5py lookup
    costs 0.1-0.3 ms).
    """
    scales = {} if scales is None else scales

    def scale(dim: str, size: int | None = None) -> h5py.Dataset:
        if dim not in scales:
            if size is not None and dim not in group:
                scales[dim] = group.create_dataset(dim, data=np.arange(size, dtype=np.int64))
                scales[dim].make_scale(dim)
            else:
                scales[dim] = group[dim]
        return scales[dim]

    ds.dims[0].attach_scale(scale(schema.CHAIN_DIM))
    ds.dims[1].attach_scale(scale(schema.DRAW_DIM))
    for k, size in enumerate(ds.shape[2:]):
        ds.dims[k + 2].attach_scale(scale(schema.dim_name(name, k), size))
