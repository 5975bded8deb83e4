"""The sample file a collector opened by path: its lock, and the checks that it is still the file written.

:class:`OwnedFile` holds ``<file>.lock`` (:mod:`jaxsave._core.filelock`) from the
collector's creation to its close. Each handle the collector opens is tracked (device,
inode, size); at every block the file must not have shrunk or lost its name, at every
flush and close the path must still name it; after close the file must read back.
Otherwise a file deleted, replaced or truncated by someone else would end a run that
reports its samples saved.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import h5py
import numpy as np

from jaxsave._core import atomic as _atomic
from jaxsave._core import filelock as _filelock
from jaxsave._core import paths as _paths
from jaxsave._core.regular_file import open_regular
from jaxsave._store import schema
from jaxsave._store.hdf5 import sample_file
from jaxsave._store.hdf5 import superblock as _superblock
from jaxsave.errors import FileChangedError, FileFormatError, FileInUseError, StructureMismatchError

__all__ = ["OwnedFile"]

_REPLACED = "was replaced by another file (moved or written there by another program)"


def _open_here(error: BaseException) -> bool:
    """Whether HDF5 refused an open because this process has the file open in another mode."""
    text = str(error)
    return "already open" in text or "not the same" in text or "locking flag values don't match" in text


#: The bytes that hold a superblock (at offset 0 to 64 KiB) and so all that
#: ``superblock.clear_open_flags`` changes (besides the file's size).
_SUPERBLOCK_SPAN = 65536 + 256


def _check_counts(f: h5py.File, where: str) -> None:
    """Each leaf's datasets are chunked, of its stored dtype and per-draw shape, and hold at
    least the draws (and chains) the file's counts say.

    A writer creates a chain's datasets all at once, at its first block: a file killed
    before that block has none of them, and no draws counted, which is not damage.
    """
    if not sample_file.has_structure(f):
        return
    counts, layout = sample_file.read_counts(f), sample_file.read_layout(f)
    variables = sample_file.read_variables(f)
    sets: list[tuple[tuple[int, ...], list[str]]]  # the leaves' datasets created together, and their lead
    if layout == schema.POSTERIOR:
        sets = [(schema.counted_lead(counts), [schema.dataset_path(layout, v) for v in variables])]
    else:
        sets = [
            ((n,), [schema.dataset_path(layout, v, c) for v in variables])
            for c, n in enumerate(counts.tolist())
        ]
        expected = {schema.chain_group(c) for c in range(len(counts))}
        prefix = schema.CHAIN_GROUP.format("")
        for name in f:  # a chain registered later would take over one it does not count
            if name.startswith(prefix) and name not in expected:
                raise FileFormatError(
                    f"{where}: it has the group {name!r}, but its sample counts cover "
                    f"{len(counts)} chain(s); the file is damaged"
                )
    for lead, paths in sets:
        found = {p: dsid for p in paths if (dsid := _open_dataset(f, p)) is not None}
        if not found and lead[-1] == 0 and not _anything_at(f, paths, layout):
            continue  # killed before its first block
        for path, var in zip(paths, variables):
            if path not in found:
                raise FileFormatError(f"{where}: it lacks the dataset {path!r}")
            dsid, (row, dtype) = found[path], schema.stored_row(var)
            chunked = dsid.get_create_plist().get_layout() == h5py.h5d.CHUNKED
            if not schema.fits(dsid.shape, lead, row) or dsid.dtype != dtype or not chunked:
                raise FileFormatError(
                    f"{where}: dataset {path!r} of leaf {var.name!r} is {dsid.shape} of "
                    f"{dsid.dtype}{'' if chunked else ', not chunked'}; its structure and sample "
                    f"counts {counts.tolist()[:8]} need at least {lead + row} of {dtype}, chunked; "
                    "the file is damaged"
                )


def _anything_at(f: h5py.File, paths: list[str], layout: str) -> bool:
    """Whether an object or link sits where the first block creates datasets (the leaves, and in
    layout ``"posterior"`` the scales ``chain`` and ``draw``): a set killed before its first
    block has none of them."""
    if layout == schema.POSTERIOR:
        groups = {p.rsplit("/", 1)[0] for p in paths}
        paths = [*paths, *(f"{g}/{d}" for g in groups for d in (schema.CHAIN_DIM, schema.DRAW_DIM))]
    return any(f.get(p, getlink=True) is not None for p in paths)


def _open_dataset(f: h5py.File, path: str) -> h5py.h5d.DatasetID | None:
    """The dataset at ``path`` (low-level: 6400 datasets in 0.2 s), or ``None`` if there is none."""
    try:
        return h5py.h5d.open(f.id, path.encode())
    except (KeyError, TypeError):
        return None


def _load_metadata(f: h5py.File) -> None:
    """Load every attribute and chunk index of ``f`` (HDF5 verifies their checksums).

    Continuing a file rewrites its datasets' headers and chunk indices. HDF5 reads
    them lazily: a damaged one found in a write fails it and can leave the library
    in a state that crashes the process at exit, so it must fail here, on reading.
    The root's attributes are read (as every reader does); the others are opened,
    not read: a damaged global heap can make HDF5 loop forever reading a string or
    reference, and continuing the file never reads them.
    """

    for key in f.attrs:
        f.attrs[key]
    names: list[bytes] = []
    # by their links, not H5Ovisit (which crashes HDF5 2.0 on some damaged chunk indices);
    # through h5py's low-level calls: 6400 datasets take 0.4 s, not 2 s
    f.id.links.visit(names.append)
    for name in names:
        oid = h5py.h5o.open(f.id, name)
        for index in range(h5py.h5a.get_num_attrs(oid)):
            h5py.h5a.open(oid, index=index).close()
        if isinstance(oid, h5py.h5d.DatasetID) and oid.get_create_plist().get_layout() == h5py.h5d.CHUNKED:
            oid.get_num_chunks()  # walks the whole chunk index


class OwnedFile:
    """The path a collector writes: locked, and checked to still name the file written.

    Args:
      path: the sample file's path.
      written: the counts the file must hold, per chain (for the checks after close and
        for the error that names how many samples were lost).

    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "run.h5")
    >>> owner = OwnedFile(path, written=lambda: [0])
    >>> owner.lock(); os.path.exists(path + ".lock")
    True
    >>> owner.release(); os.path.exists(path + ".lock")
    False
    """

    def __init__(self, path: str, written: Callable[[], Sequence[int]]):
        self.path = path
        self._written = written
        self._file_lock: _filelock.FileLock | None = None
        self._handle: h5py.File | None = None
        self._on_disk: tuple[int, int, int, int] | None = None  # device, inode, size, descriptor

    # -- the lock ---------------------------------------------------------------------------

    def lock(self) -> None:
        """Take ``<file>.lock``, if not held already (another writer: :class:`jaxsave.FileInUseError`)."""
        if self._file_lock is None:
            self._file_lock = _filelock.acquire(self.path)

    def release(self) -> None:
        """Stop tracking the file and release its lock."""
        self._handle, self._on_disk = None, None
        lock, self._file_lock = self._file_lock, None
        if lock is not None:
            lock.release()

    # -- before opening -----------------------------------------------------------------------

    def check_path(self) -> None:
        """The path can name a new file: its directory exists, and it is not a directory."""
        _paths.check_directory(self.path)
        if os.path.isdir(self.path):
            raise IsADirectoryError(f"{self.path!r} is a directory; HDF5Collector needs a file path")

    def remove_stale_temporaries(self, suffixes: Sequence[str] = ()) -> None:
        """Delete what writers killed while changing this file (or ``<file><suffix>``) left next to it."""
        directory, name = _paths.directory_of(self.path), os.path.basename(self.path)
        if os.path.isdir(directory):
            for target in (name, *(name + suffix for suffix in suffixes)):
                _atomic.remove_stale_temporaries(directory, target=target)

    def check_takeover(self, layout: str) -> None:
        """mode="a": the path must be a jaxsave sample file (not another program's HDF5 file)
        whose data all lives in it (no external storage or links, which writes would follow),
        whose metadata all reads back (:func:`_load_metadata`), whose datasets hold the
        draws its counts say, and whose layout is ``layout`` (else a
        :class:`jaxsave.StructureMismatchError`).

        A killed writer's marks are cleared first (``superblock.clear_open_flags``), so that
        HDF5 opens it; a file then refused gets its first bytes and its size back. Every
        refusal is a :class:`jaxsave.FileFormatError` (a file this process holds open: a
        :class:`jaxsave.FileInUseError`), and leaves the file as it was.
        """
        where = f"{self.path!r} (mode='a')"
        with open_regular(self.path) as fh:  # a FIFO would block h5py's open
            head, size = fh.read(_SUPERBLOCK_SPAN), os.fstat(fh.fileno()).st_size
        try:
            # A killed writer's mark and lagging end address: we take the file over.
            cleared = _superblock.clear_open_flags(self.path, eoa_margin=_superblock.EOA_MARGIN)
        except FileFormatError as error:
            raise FileFormatError(f"{where}: {error}") from error
        try:
            self._check_file(where, layout)
        except BaseException:
            if cleared:
                with open(self.path, "r+b") as fh:
                    fh.write(head)
                    fh.truncate(size)
            raise

    def _check_file(self, where: str, layout: str) -> None:
        try:
            with h5py.File(self.path, "r", locking=False) as f:
                if schema.FORMAT not in f.attrs:
                    raise FileFormatError(
                        f"{self.path!r} is an HDF5 file not written by jaxsave; mode='a' "
                        "only continues jaxsave sample files (use mode='w' to replace it)"
                    )
                if schema.MERGED_FROM in f.attrs:
                    raise FileFormatError(
                        f"{where}: jaxsave.merge wrote this file (its datasets map the data of "
                        "its source files, which it never changes); continue a source file, "
                        "then merge again"
                    )
                sample_file.check_header(f, self.path, merged=False, where=where)
                stored = sample_file.read_layout(f)
                if stored != layout:
                    raise StructureMismatchError(
                        f"{self.path!r} holds its samples in layout {stored!r}; continue it with "
                        f"HDF5Collector(..., mode='a', layout={stored!r})"
                    )
                _load_metadata(f)
                _check_counts(f, where)
        except (OSError, RuntimeError, KeyError, ValueError) as error:
            if isinstance(error, (FileFormatError, StructureMismatchError)):
                raise
            if _open_here(error):
                raise FileInUseError(
                    f"{self.path!r} is open in this process (an h5py.File, or a reader not yet "
                    "closed): close it before continuing the file with mode='a'"
                ) from error
            raise FileFormatError(
                f"{self.path!r} is damaged ({error}); mode='a' continues only a sample file "
                "whose metadata all reads back, and wrote nothing to it"
            ) from error

    # -- while writing ------------------------------------------------------------------------

    def track(self, handle: h5py.File, driver: str | None) -> None:
        """Remember the file of a (re)opened handle (and its size): the first thing to check.

        ``driver`` is the handle's HDF5 driver (``None`` if it is closed), as the caller read it
        once for the handle (``HeldFile.driver``).
        """
        self._handle, self._on_disk = handle, None
        if handle.id.valid and driver == "sec2":
            fd = handle.id.get_vfd_handle()
            mine = os.fstat(fd)
            self._on_disk = (mine.st_dev, mine.st_ino, mine.st_size, fd)

    @property
    def identity(self) -> tuple[int, int] | None:
        """``(device, inode)`` of the tracked file (``None`` if not a plain file)."""
        return self._on_disk[:2] if self._on_disk is not None else None

    def check_size(self) -> None:
        """Per block (one ``fstat``): the file is still linked and did not shrink; else as below."""
        known = self._on_disk
        if known is None:
            return
        mine = os.fstat(known[3])
        if mine.st_nlink == 0 or mine.st_size < known[2]:
            self.check_on_disk()
        self._on_disk = (*known[:2], mine.st_size, known[3])

    def check_on_disk(self, *, baseline: bool = False) -> None:
        """Refuse to go on once the path no longer names the file written, as long as it was.

        Otherwise a file deleted, replaced or truncated by someone else mid-run
        would end in a run that reports its samples saved with the file gone or
        unreadable. The size may only grow between two checks (HDF5 itself
        changes it only in a flush: ``baseline`` records the size after one).
        """
        known = self._on_disk
        if known is None or self._handle is None or not self._handle.id.valid:  # not a plain file
            return
        mine = os.fstat(known[3])
        try:
            now = os.stat(self.path)
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
            f"{self.path!r} {what} while HDF5Collector was writing it: what it wrote "
            f"({sum(self._written())} samples so far) is not (all) in the file on disk any more"
        )

    # -- after close --------------------------------------------------------------------------

    def verify_closed(self, identity: tuple[int, int] | None, datasets: list[str]) -> None:
        """After close: the path still names the file written (``identity``), and it reads back
        with the expected counts (one element of each of ``datasets`` read)."""
        try:
            now = os.stat(self.path)
        except FileNotFoundError:
            raise self._lost("was deleted") from None
        if identity is not None and (now.st_dev, now.st_ino) != identity:
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
        eof = _superblock.stored_eof(self.path)
        if eof is not None and eof > os.path.getsize(self.path):  # SWMR readers would wait for it
            raise ValueError(f"{os.path.getsize(self.path)} bytes, the superblock says {eof}")
        with h5py.File(self.path, "r", **({"libver": "latest", "swmr": True} if swmr else {})) as f:
            counts = np.asarray(f.attrs.get(schema.COUNTS, ()), np.int64).reshape(-1).tolist()
            expected = list(self._written())
            if counts != expected:
                raise ValueError(f"its sample_counts are {counts}, not {expected}")
            for name in datasets:
                ds = f[name]
                if ds.size:
                    ds[tuple(n - 1 for n in ds.shape)]
