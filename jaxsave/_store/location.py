"""What a sample source is: a Zarr store or an HDF5 file. Decided here, once, for every reader.

A source is a Zarr store when it is a URL (``memory://...``, ``s3://...``, ``file://...``),
a directory (a Zarr store has ``zarr.json`` at its root; a directory without it is refused
by the Zarr reader with an error that says so), or a ``zarr`` store or group object.
Anything else is a path to an HDF5 file. This module imports neither h5py nor zarr.

>>> import tempfile
>>> is_zarr(tempfile.mkdtemp()), is_zarr("memory://run"), is_zarr("run.h5")
(True, True, False)
"""

from __future__ import annotations

import os
from typing import Any

#: Zarr's file name at the root of a store (and of each group and array).
ZARR_JSON = "zarr.json"


def is_url(source: Any) -> bool:
    """Whether ``source`` is a string that names a store by URL (``protocol://...``)."""
    return isinstance(source, str) and "://" in source


def is_zarr_object(source: Any) -> bool:
    """Whether ``source`` is an object of the ``zarr`` package (a store, a group)."""
    return type(source).__module__.split(".")[0] == "zarr"


def is_zarr(source: Any) -> bool:
    """Whether ``source`` is read and written as a Zarr store (see the module's rules)."""
    if is_zarr_object(source) or is_url(source):
        return True
    if isinstance(source, (str, os.PathLike)):
        return os.path.isdir(os.fspath(source))
    return False


def check_storage_options(source: Any, storage_options: Any) -> None:
    """Refuse ``storage_options`` that are not a dict, or that come with an HDF5 file: they are
    fsspec's options (credentials, ``endpoint_url``...) for a Zarr store named by URL."""
    if storage_options is None:
        return
    if not isinstance(storage_options, dict):
        raise TypeError(
            f"storage_options must be a dict of fsspec options or None, got {type(storage_options).__name__}"
        )
    if not is_zarr(source):
        raise TypeError(
            f"storage_options= are fsspec options for a Zarr store named by URL (s3://...); "
            f"{describe(source)} is an HDF5 file, which takes none"
        )


def describe(source: Any) -> str:
    """``source`` as messages name it."""
    if isinstance(source, (str, os.PathLike)):
        return repr(os.fspath(source))
    return repr(source)
