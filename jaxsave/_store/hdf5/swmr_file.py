"""An HDF5 file on disk that is always complete and closed, or open in SWMR mode.

A writer killed at any moment must leave a file that opens. HDF5 guarantees that
for a file in single-writer/multiple-reader (SWMR) mode, but not for one that is
open for ordinary writing. So a path is only ever written in SWMR mode; what SWMR
does not allow (creating datasets or attributes) is done on a copy written aside,
which then replaces the file by an atomic rename.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Iterator
from typing import Any

import h5py

from jaxsave._core import atomic as _atomic
from jaxsave._store.hdf5 import superblock as _superblock

#: Chunk cache per dataset: holds partial ~1 MiB chunks; bigger chunks (big samples) bypass it.
CACHE_BYTES = 2 * 2**20
_CACHE_SLOTS = 100_003


def open_path(path: str, mode: str, *, swmr: bool) -> h5py.File:
    """Open ``path`` the ordinary way (``libver="latest"`` when it will be used with SWMR)."""
    kwargs: dict[str, Any] = {"rdcc_nbytes": CACHE_BYTES, "rdcc_nslots": _CACHE_SLOTS}
    if swmr:
        kwargs["libver"] = "latest"
    return h5py.File(path, mode, **kwargs)


#: How long :func:`reopen` waits for readers that hold the file (see there).
REOPEN_WAIT_S = 10.0


def reopen(path: str, *, swmr: bool) -> h5py.File:
    """Open ``path`` for writing: straight into SWMR mode when ``swmr`` (never "open, not SWMR").

    After a copy replaced the file, a reader can open it before the writer does
    (``jaxsave.file_info`` polling it, say), and HDF5 refuses the writer while a
    reader in this process, or a non-SWMR reader elsewhere (file lock), has it
    open. Such opens are short: wait for them, at most :data:`REOPEN_WAIT_S`.
    """
    delay, deadline = 0.001, time.monotonic() + REOPEN_WAIT_S
    while True:
        try:
            return _open_for_writing(path, swmr=swmr)
        except OSError as error:
            busy = "already open" in str(error) or "unable to lock file" in str(error)
            if not busy:
                raise
            if time.monotonic() > deadline:
                raise OSError(
                    error.errno,
                    f"cannot reopen {path!r} for writing: a reader kept it open for "
                    f"{REOPEN_WAIT_S:g} s (readers of a file being written must use "
                    f"SWMR, e.g. jaxsave.open_live; {error})",
                ) from error
            time.sleep(delay)
            delay = min(2 * delay, 0.05)


def _open_for_writing(path: str, *, swmr: bool) -> h5py.File:
    if not swmr:
        return open_path(path, "r+", swmr=False)
    fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
    fapl.set_libver_bounds(h5py.h5f.LIBVER_LATEST, h5py.h5f.LIBVER_LATEST)
    fapl.set_cache(0, _CACHE_SLOTS, CACHE_BYTES, 0.75)
    flags = h5py.h5f.ACC_RDWR | h5py.h5f.ACC_SWMR_WRITE
    return h5py.File(h5py.h5f.open(os.fsencode(path), flags, fapl=fapl))


@contextlib.contextmanager
def replaced(path: str, *, copy: bool, swmr: bool) -> Iterator[h5py.File]:
    """A writable file that replaces ``path`` when the block ends without an error.

    It starts as a copy of ``path`` (``copy=True``) or empty, is written under a
    temporary name of :func:`jaxsave._core.atomic.atomic_path` (so a killed writer's
    leftover is cleaned like any other), closed, and renamed over ``path``; on an
    error ``path`` is left as it was. Close ``path`` before entering.
    """
    with _atomic.atomic_path(path, fsync=False) as tmp:
        if copy:
            shutil.copyfile(path, tmp)
            # A reader in this process can hold the closed file open (HDF5 shares one open file
            # per process), so it may still be marked open for writing: the copy is ours alone.
            _superblock.clear_open_flags(tmp)
        file = open_path(tmp, "r+" if copy else "w", swmr=swmr)
        try:
            yield file
        finally:
            file.close()
