"""The ``h5py.File`` an HDF5 collector writes, and how its structure may change.

A path is opened by :meth:`HeldFile.create` (a new file appears only complete: written
aside, then renamed) and, with ``swmr``, is only ever written in SWMR mode: what SWMR
mode does not allow (creating datasets or attributes) is done by :meth:`HeldFile.change`
on a copy that then replaces the file (:mod:`jaxsave._store.hdf5.swmr_file`). So the
file on disk is complete or in SWMR mode whenever the process is killed. A user's open
``h5py.File`` (:meth:`HeldFile.given`) is changed in place.

The handle changes with every such swap: hold paths, not handles, across
:meth:`HeldFile.change` (or compare :attr:`HeldFile.file` with the handle you hold).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence

import h5py

from jaxsave._store.hdf5 import sample_file
from jaxsave._store.hdf5 import superblock as _superblock
from jaxsave._store.hdf5 import swmr_file as _swmr_file
from jaxsave._store.hdf5.owner import OwnedFile
from jaxsave.errors import FileFormatError, SaverStateError

__all__ = ["HeldFile"]


class HeldFile:
    """The open file of a collector: a path it owns (``owner``), or a user's ``h5py.File``.

    Use :meth:`create` (a path) or :meth:`given` (an open file).

    >>> import os, tempfile, h5py
    >>> path = os.path.join(tempfile.mkdtemp(), "run.h5")
    >>> owner = OwnedFile(path, written=lambda: [])
    >>> held = HeldFile.create(owner, "w", swmr=True, layout="posterior")
    >>> held.file.swmr_mode, held.file.attrs["jaxsave_layout"]  # a path is written in SWMR mode
    (True, 'posterior')
    >>> handle = held.file
    >>> held.change(lambda: held.file.create_dataset("x", data=[1, 2]))  # on a copy, then renamed
    >>> held.file is handle, held.file.swmr_mode, held.file["x"][:].tolist()
    (False, True, [1, 2])
    >>> held.file.close(); owner.release()
    """

    def __init__(self, handle: h5py.File, *, swmr: bool, owner: OwnedFile | None):
        self.swmr = swmr
        self.owner = owner
        self.file = handle
        self.filename: str = handle.filename  # still known after close

    @property
    def file(self) -> h5py.File:
        """The open handle (a new one after every swap of the file)."""
        return self._handle

    @file.setter
    def file(self, handle: h5py.File) -> None:
        self._handle = handle
        #: The handle's HDF5 driver, read once (``File.driver`` costs 10 us; it is needed per block).
        self.driver: str | None = handle.driver if handle.id.valid else None
        if self.owner is not None:
            # every (re)opened handle: remember its file, the first thing to check
            self.owner.track(handle, driver=self.driver)

    # -- opening ------------------------------------------------------------------------------

    @classmethod
    def given(cls, file: h5py.File, *, swmr: bool | None, layout: str) -> HeldFile:
        """A user's open, writable file: checked, and given the root attributes of ``layout``."""
        if not file.id.valid:
            raise ValueError("the h5py.File is closed")
        if file.mode != "r+":
            raise ValueError("the h5py.File must be open for writing")
        latest = file.libver[0] not in ("earliest", "v108")
        if swmr and not latest:
            raise ValueError("swmr=True needs an h5py.File opened with libver='latest'")
        held = cls(file, swmr=latest if swmr is None else bool(swmr), owner=None)
        sample_file.write_root_attributes(file.attrs, layout)
        return held

    @classmethod
    def create(
        cls, owner: OwnedFile, mode: str, *, swmr: bool, layout: str, sidecars: Sequence[str] = ()
    ) -> HeldFile:
        """Lock ``owner``'s path and open it with ``mode`` (``"w"``, ``"x"`` or ``"a"``).

        The temporaries of killed writers (of the file and of ``<file><sidecar>``) are
        removed first; a new file (``"w"``, ``"x"``) also removes the sidecars of the file
        it replaces (its checkpoints). The lock stays taken if opening fails: release ``owner``.
        """
        path = owner.path
        owner.check_path()
        owner.lock()  # one writer per path, until the collector closes
        owner.remove_stale_temporaries(sidecars)
        exists = os.path.exists(path)
        if mode == "x" and exists:
            raise FileExistsError(f"{path!r} exists (mode='x')")
        if mode == "a" and exists:
            owner.check_takeover(layout)  # damaged, foreign or hostile: refused; a killed writer's: cleared
            version = _superblock.version(path) if swmr else 3
            if version < 3:
                raise FileFormatError(
                    f"{path!r} was written with swmr=False (HDF5 superblock version {version}), "
                    "which HDF5 cannot continue in SWMR mode: pass swmr=False to continue it"
                )
            held = cls(_swmr_file.open_path(path, "r+", swmr=swmr), swmr=swmr, owner=owner)
            if not swmr:
                sample_file.write_root_attributes(held.file.attrs, layout)
                return held
            stale = sample_file.root_attributes_stale(held.file.attrs, layout)
            held.file.close()
            if stale:  # rewriting attributes needs a copy in SWMR files: only when they change
                held.change(lambda: sample_file.write_root_attributes(held.file.attrs, layout))
            else:
                held.file = _swmr_file.reopen(path, swmr=True)
            return held
        with _swmr_file.replaced(path, copy=False, swmr=swmr) as new:
            sample_file.write_root_attributes(new.attrs, layout)
        for sidecar in sidecars:  # a new file is in place: what belonged to the one it replaced is void
            with contextlib.suppress(FileNotFoundError):
                os.remove(path + sidecar)
        return cls(_swmr_file.reopen(path, swmr=swmr), swmr=swmr, owner=owner)

    def reopen(self) -> bool:
        """Reopen a path that :meth:`close` closed (``True``); ``False`` if the file is open.

        A user's file that was closed is refused with a ``ValueError``.
        """
        if self.file.id.valid:
            return False
        if self.owner is None:
            raise ValueError("the h5py.File given to HDF5Collector was closed")
        self.owner.lock()
        self.file = _swmr_file.reopen(self.owner.path, swmr=self.swmr)
        return True

    # -- changing its structure -----------------------------------------------------------------

    def change(self, change: Callable[[], None], *, then_swmr: bool = False) -> None:
        """Run ``change`` (which creates objects or attributes in :attr:`file`) where SWMR allows it.

        A path opened with ``swmr`` is changed on a copy that then replaces it, so
        the file on disk is always complete or in SWMR mode, whenever the process
        is killed; ``change`` sees the copy as :attr:`file`. Other files are changed
        in place (and enter SWMR mode after, if ``then_swmr``: once the datasets exist).
        """
        if self.owner is None or not self.swmr:
            if self.file.swmr_mode:  # a user's file: it cannot be swapped
                self._change_in_swmr_mode(change)
            else:
                change()
            if then_swmr:
                self.start_swmr()
            return
        if self.file.id.valid:
            self.owner.check_on_disk()  # never copy (and so adopt) what someone else put at the path
            self.file.flush()  # complete on disk even if a reader in this process keeps it open
            self.file.close()  # ... which kills every handle into it
        with _swmr_file.replaced(self.owner.path, copy=True, swmr=True) as copy:
            self.file = copy
            change()
        self.file = _swmr_file.reopen(self.owner.path, swmr=True)

    def _change_in_swmr_mode(self, change: Callable[[], None]) -> None:
        """Change a user-supplied file that is in SWMR mode already, in place.

        SWMR mode cannot be left, and the file cannot be replaced by a copy, so a
        chain added after the first block (the older library's ``strategy="map"``)
        gets its datasets and counts right there, in SWMR mode: HDF5 writes them, but
        neither SWMR readers nor a killed process are guaranteed a consistent file
        while it does (the collector warns).
        """
        try:
            change()
        except (RuntimeError, OSError, ValueError, KeyError) as error:
            raise SaverStateError(
                f"this HDF5 library cannot add a chain to the h5py.File {self.filename!r} in "
                f"SWMR mode ({error}); pass a path, open the file without libver='latest' (or "
                "pass swmr=False), or init every chain before running"
            ) from error

    def start_swmr(self) -> None:
        """Enter SWMR mode, if the file is to be written that way (once its datasets exist)."""
        if self.swmr and not self.file.swmr_mode:
            self.file.swmr_mode = True

    # -- the checks of an owned path ------------------------------------------------------------

    def check_size(self) -> None:
        """Per block: an owned file did not shrink or lose its name (:meth:`OwnedFile.check_size`)."""
        if self.owner is not None:
            self.owner.check_size()

    def check_on_disk(self, *, baseline: bool = False) -> None:
        """An owned path still names the file written (:meth:`OwnedFile.check_on_disk`)."""
        if self.owner is not None:
            self.owner.check_on_disk(baseline=baseline)
