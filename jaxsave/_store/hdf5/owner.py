"""The sample file a collector owns: its lock, and the checks that it is still the file written.

A mixin of :class:`jaxsave.HDF5Collector`. The collector holds ``<file>.lock``
(:mod:`jaxsave._core.filelock`) from its creation to its close. Each handle it opens is
remembered (device, inode, size); at every block it must not have shrunk or lost
its name, at every flush and close the path must still name it; after close the file
must read back. Otherwise a file deleted, replaced or truncated by someone else
would end a run that reports its samples saved.
"""

from __future__ import annotations

import os

import h5py
import numpy as np

from jaxsave._core import filelock as _filelock
from jaxsave._store import schema
from jaxsave._store.hdf5 import superblock as _superblock
from jaxsave.errors import FileChangedError

_REPLACED = "was replaced by another file (moved or written there by another program)"


def _open_here(error: BaseException) -> bool:
    """Whether HDF5 refused an open because this process has the file open in another mode."""
    return "already open" in str(error) or "not the same" in str(error)


class OwnedFile:
    """The file of a collector that opened it by path (``_owned``), locked and checked."""

    _path: str | None
    _owned: bool
    _counts: list[int]
    _file_lock: _filelock.FileLock | None
    _on_disk: tuple[int, int, int, int] | None  # device, inode, size, descriptor

    @property
    def _file(self) -> h5py.File:
        return self._handle

    @_file.setter
    def _file(self, handle: h5py.File) -> None:
        """Every (re)opened handle: remember its file (and size), the first thing to check."""
        self._handle, self._on_disk = handle, None
        if getattr(self, "_owned", False) and handle.id.valid and handle.driver == "sec2":
            fd = handle.id.get_vfd_handle()
            mine = os.fstat(fd)
            self._on_disk = (mine.st_dev, mine.st_ino, mine.st_size, fd)

    def _check_size(self) -> None:
        """Per block (one ``fstat``): our file is still linked and did not shrink; else as below."""
        known = self._on_disk
        if known is None:
            return
        mine = os.fstat(known[3])
        if mine.st_nlink == 0 or mine.st_size < known[2]:
            self._check_on_disk()
        self._on_disk = (*known[:2], mine.st_size, known[3])

    def _check_on_disk(self, *, baseline: bool = False) -> None:
        """Refuse to go on once the path no longer names the file written, as long as it was.

        Otherwise a file deleted, replaced or truncated by someone else mid-run
        would end in a run that reports its samples saved with the file gone or
        unreadable. The size may only grow between two checks (HDF5 itself
        changes it only in a flush: ``baseline`` records the size after one).
        """
        known = self._on_disk
        if known is None or not self._file.id.valid:  # not ours, or not a plain file
            return
        mine = os.fstat(known[3])
        try:
            now = os.stat(self._path)
        except FileNotFoundError:
            now = None
        if now is None or mine.st_nlink == 0:
            raise self._lost("was deleted" if now is None else _REPLACED)
        if (now.st_dev, now.st_ino) != known[:2]:
            raise self._lost(_REPLACED)
        if not baseline and mine.st_size < known[2]:
            raise self._lost(f"was truncated from {known[2]} to {mine.st_size} bytes")
        self._on_disk = (*known[:2], mine.st_size, known[3])

    def _lost(self, what: str) -> FileChangedError:
        return FileChangedError(
            f"{self._path!r} {what} while HDF5Collector was writing it: what it wrote "
            f"({sum(self._counts)} samples so far) is not (all) in the file on disk any more"
        )

    def _verify_closed(self, inode: tuple[int, int] | None, datasets: list[str]) -> None:
        """After close: the path still names the file written, and it reads back with our counts."""
        try:
            now = os.stat(self._path)
        except FileNotFoundError:
            raise self._lost("was deleted") from None
        if inode is not None and (now.st_dev, now.st_ino) != inode:
            raise self._lost(_REPLACED)
        try:
            self._read_back(datasets, swmr=False)
        except (OSError, KeyError, ValueError, RuntimeError) as error:
            if not _open_here(error):
                raise self._lost(f"does not read back after close ({error})") from error
            try:  # a reader in this process holds it in SWMR mode: read it that way
                self._read_back(datasets, swmr=True)
            except (OSError, KeyError, ValueError, RuntimeError) as again:
                if not _open_here(again):
                    raise self._lost(f"does not read back after close ({again})") from again

    def _read_back(self, datasets: list[str], *, swmr: bool) -> None:
        """Open the closed file, compare its counts, read one element (and index) per dataset."""
        eof = _superblock.stored_eof(self._path)
        if eof is not None and eof > os.path.getsize(self._path):  # SWMR readers would wait for it
            raise ValueError(f"{os.path.getsize(self._path)} bytes, the superblock says {eof}")
        with h5py.File(
            self._path, "r", **({"libver": "latest", "swmr": True} if swmr else {})
        ) as f:
            counts = np.asarray(f.attrs.get(schema.COUNTS, ()), np.int64).reshape(-1).tolist()
            if counts != self._counts:
                raise ValueError(f"its sample_counts are {counts}, not {self._counts}")
            for name in datasets:
                ds = f[name]
                if ds.size:
                    ds[tuple(n - 1 for n in ds.shape)]

    def _release_lock(self) -> None:
        lock, self._file_lock = self._file_lock, None
        if lock is not None:
            lock.release()
