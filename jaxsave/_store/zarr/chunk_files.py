"""Reading a local Zarr v3 array's uncompressed chunks with plain file reads, into the result.

zarr-python decodes every chunk through its async codec pipeline and copies it at least once;
for a local store whose chunks are the raw bytes of C-ordered rows (the codec chain exactly
``bytes`` with the machine's endianness, no sharding, no transposes), each chunk file can be
read (``preadv``) straight into its place in the preallocated result. :func:`chunk_files`
says whether an array qualifies (else the readers use zarr); :class:`ChunkFiles` reads it.

It never reads outside the store: every directory below the store's root and every chunk
file is opened relative to its parent with ``O_NOFOLLOW`` (a symbolic link anywhere below the
root is refused), ``O_NONBLOCK`` (a FIFO cannot hang the read) and checked with ``fstat``
to be a regular file (a device is refused) of exactly the chunk's byte size (else a
:class:`jaxsave.FileFormatError` naming the key). A chunk that is not there reads as the
fill value, as in zarr. Large reads use a few threads (file reads release the GIL).
"""

from __future__ import annotations

import errno
import json
import math
import os
import stat
import sys
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from jaxsave._store.location import ZARR_JSON
from jaxsave._store.zarr.confined import refused
from jaxsave.errors import FileFormatError

#: The Zarr data types read directly (plain numeric types; anything else goes through zarr).
DATA_TYPES = frozenset(
    ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"]
    + ["float16", "float32", "float64", "complex64", "complex128"]
)
#: The largest ``zarr.json`` of an array read without zarr (larger ones go to zarr).
MAX_METADATA_BYTES = 2**20
#: Threads of a large read (file reads release the GIL; more do not help a page-cache read).
THREADS = max(1, min(4, os.cpu_count() or 1))
#: Reads of at least this many bytes (and more than one chunk) use :data:`THREADS` threads.
THREADED_BYTES = 8 * 2**20
#: How a chunk file or directory is opened: never through a symbolic link, never blocking.
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_FILE_FLAGS = os.O_RDONLY | _NOFOLLOW | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
_DIR_FLAGS = _FILE_FLAGS | getattr(os, "O_DIRECTORY", 0)
#: The platform opens relative to a directory and refuses links (Linux, macOS).
SUPPORTED = (
    bool(_NOFOLLOW) and hasattr(os, "O_DIRECTORY") and hasattr(os, "preadv") and os.open in os.supports_dir_fd
)

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _reset_pool() -> None:  # a forked child has none of its parent's threads
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_pool)


def _threads() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(THREADS, thread_name_prefix="jaxsave-chunks")
        return _pool


def _part_ok(part: str) -> bool:
    return bool(part) and part not in (".", "..") and "\0" not in part and "/" not in part


def open_dir(parent: int, name: str, key: str, array: str) -> int | None:
    """The directory ``name`` below the open directory ``parent``, ``None`` if it is not there;
    a symbolic link or a file there is a :class:`FileFormatError` (``key``, ``array``: its names)."""
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=parent)
    except FileNotFoundError:
        return None
    except OSError as error:
        if error.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
            raise refused(f"array {array!r}", key, "a symbolic link or a file, not a directory") from error
        raise


def array_dir(root: str, parts: tuple[str, ...]) -> int | None:
    """The directory of the array ``parts`` below the store's ``root``, opened one name at a time
    (none of them a link); ``None`` if one is not there."""
    fd: int | None = os.open(root, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
    for i, part in enumerate(parts):
        assert fd is not None
        parent, fd = fd, open_dir(fd, part, "/".join(parts[: i + 1]), "/".join(parts))
        os.close(parent)
        if fd is None:
            return None
    return fd


def chunk_files(array: Any) -> ChunkFiles | None:
    """The direct reader of the ``zarr.Array`` ``array``, or ``None`` where zarr must read it:
    not a local store, compressed or sharded chunks, any codec but ``bytes`` in the machine's
    byte order, a data type outside :data:`DATA_TYPES`, trailing axes split into chunks."""
    store: Any = getattr(array, "store", None)
    if not SUPPORTED or type(store).__name__ != "LocalStore":
        return None
    try:
        meta = array.metadata.to_dict()
        root = os.fspath(store.root)
        parts = tuple(str(array.path).split("/")) if array.path else ()
        fill = np.asarray(array.fill_value)
        if np.dtype(array.dtype) != np.dtype(meta.get("data_type")):
            return None
    except Exception:  # an object unlike zarr 3's array: let zarr read it
        return None
    return from_metadata(meta, root, parts, fill)


def _json_fill(value: Any, dtype: np.dtype) -> np.ndarray | None:
    """A ``fill_value`` of ``zarr.json`` as ``dtype`` (the plain forms only; ``None`` for others)."""
    special = {"NaN": np.nan, "Infinity": np.inf, "-Infinity": -np.inf}

    def scalar(v: Any) -> Any:
        if isinstance(v, bool) and dtype.kind == "b":
            return v
        if isinstance(v, int) and not isinstance(v, bool) and dtype.kind in "iufc":
            return v
        if isinstance(v, float) and dtype.kind in "fc":
            return v
        if isinstance(v, str) and v in special and dtype.kind in "fc":
            return special[v]
        raise ValueError(v)

    try:
        if dtype.kind == "c" and isinstance(value, list) and len(value) == 2:
            return np.asarray(complex(scalar(value[0]), scalar(value[1])), dtype)
        out = np.asarray(scalar(value), dtype)
        return out if dtype.kind in "fcb" or out == value else None  # an int out of range wraps
    except (ValueError, TypeError, OverflowError):
        return None


def metadata_file(root: str, parts: tuple[str, ...]) -> dict | None:
    """The ``zarr.json`` of the array at ``parts`` below the local store ``root``, parsed, read
    as the chunk files are (no link followed, a regular file, at most :data:`MAX_METADATA_BYTES`);
    ``None`` when it is not there or not of that kind (zarr then opens the array)."""
    if not SUPPORTED or not all(_part_ok(p) for p in parts):
        return None
    top = array_dir(root, parts)
    if top is None:
        return None
    try:
        fd = os.open(ZARR_JSON, _FILE_FLAGS, dir_fd=top)
    except OSError:
        return None
    finally:
        os.close(top)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_METADATA_BYTES:
            return None
        raw = os.pread(fd, info.st_size + 1, 0)
    finally:
        os.close(fd)
    try:
        meta = json.loads(raw)
    except ValueError:
        return None
    return meta if isinstance(meta, dict) else None


def local_chunk_files(root: str, path: str) -> ChunkFiles | None:
    """The direct reader of the array ``path`` (below the local store ``root``), from its
    ``zarr.json`` read without zarr; ``None`` where zarr must open and read it."""
    parts = tuple(path.split("/"))
    meta = metadata_file(root, parts)
    if meta is None or not isinstance(meta.get("data_type"), str) or meta["data_type"] not in DATA_TYPES:
        return None
    fill = _json_fill(meta.get("fill_value"), np.dtype(meta["data_type"]))
    return None if fill is None else from_metadata(meta, root, parts, fill)


def _sizes(value: Any, least: int) -> tuple[int, ...] | None:
    if not isinstance(value, (list, tuple)):
        return None
    ok = all(isinstance(n, int) and not isinstance(n, bool) and n >= least for n in value)
    return tuple(value) if ok else None


def from_metadata(meta: dict, root: str, parts: tuple[str, ...], fill: Any) -> ChunkFiles | None:
    """The direct reader of an array whose metadata (the ``zarr.json`` dict) is ``meta``, or
    ``None`` unless it is exactly what :func:`chunk_files` reads."""
    if not SUPPORTED or sys.byteorder != "little" or not all(_part_ok(p) for p in parts):
        return None
    if meta.get("zarr_format") != 3 or meta.get("node_type") != "array" or meta.get("storage_transformers"):
        return None
    name = meta.get("data_type")
    if not isinstance(name, str) or name not in DATA_TYPES:
        return None
    dtype = np.dtype(name)
    codecs = meta.get("codecs")
    if not isinstance(codecs, (list, tuple)) or len(codecs) != 1 or not isinstance(codecs[0], dict):
        return None
    codec = codecs[0]
    endian = (codec.get("configuration") or {}).get("endian")
    if codec.get("name") != "bytes" or not (endian == "little" or (endian is None and dtype.itemsize == 1)):
        return None
    grid, keys = meta.get("chunk_grid") or {}, meta.get("chunk_key_encoding") or {}
    if not isinstance(grid, dict) or not isinstance(keys, dict):
        return None
    shape = _sizes(meta.get("shape"), 0)
    chunks = _sizes((grid.get("configuration") or {}).get("chunk_shape"), 1)
    separator = (keys.get("configuration") or {}).get("separator", "/")
    if (
        grid.get("name") != "regular"
        or keys.get("name") != "default"
        or separator not in ("/", ".")
        or not shape
        or chunks is None
        or len(chunks) != len(shape)
    ):
        return None
    try:
        fill = np.asarray(fill)
        fill = fill.astype(dtype) if fill.dtype != dtype else fill
    except (TypeError, ValueError):
        return None
    if fill.shape != ():
        return None
    return ChunkFiles(root, parts, shape, chunks, dtype, fill, separator, "/".join(parts) or "/")


class ChunkFiles:
    """The chunk files of one local array (see :func:`chunk_files`), read by plain file reads."""

    def __init__(
        self,
        root: str,
        parts: tuple[str, ...],
        shape: tuple[int, ...],
        chunks: tuple[int, ...],
        dtype: np.dtype,
        fill: np.ndarray,
        separator: str,
        name: str,
    ):
        self.root, self.parts, self.shape, self.chunks = root, parts, shape, chunks
        self.dtype, self.fill, self.separator, self.name = dtype, fill, separator, name
        self.chunk_nbytes = math.prod(chunks) * dtype.itemsize

    def key(self, index: Sequence[int]) -> str:
        """The chunk's key below the array (``c/0/3/0`` or ``c.0.3.0``)."""
        return self.separator.join(["c", *map(str, index)])

    # -- the store's directories, opened without following links -------------------------

    def _open_dir(self, parent: int, name: str, key: str) -> int | None:
        return open_dir(parent, name, key, self.name)

    def _array_dir(self) -> int | None:
        return array_dir(self.root, self.parts)

    def stored_bytes(self) -> int:
        """The bytes of the chunk files in the store: one walk of the array's chunk directories,
        counting each regular file named as a chunk of the grid and of exactly a chunk's size
        (what a read can take from the store; anything else is refused when read)."""
        top = self._array_dir()
        if top is None:
            return 0
        grid = [-(-n // c) for n, c in zip(self.shape, self.chunks)]
        try:
            if self.separator == ".":
                return self._walk_flat(top, grid)
            sub = self._open_dir(top, "c", "c")
            if sub is None:
                return 0
            try:
                return self._walk(sub, grid)
            finally:
                os.close(sub)
        finally:
            os.close(top)

    @staticmethod
    def _index(name: str, limit: int) -> bool:
        return name.isascii() and name.isdigit() and int(name) < limit

    def _counted(self, entry: os.DirEntry) -> int:
        if (
            entry.is_file(follow_symlinks=False)
            and entry.stat(follow_symlinks=False).st_size == self.chunk_nbytes
        ):
            return self.chunk_nbytes
        return 0

    def _walk(self, fd: int, grid: list[int]) -> int:
        total = 0
        with os.scandir(fd) as entries:
            for entry in entries:
                if not self._index(entry.name, grid[0]):
                    continue
                if len(grid) == 1:
                    total += self._counted(entry)
                elif entry.is_dir(follow_symlinks=False):
                    sub = os.open(entry.name, _DIR_FLAGS, dir_fd=fd)
                    try:
                        total += self._walk(sub, grid[1:])
                    finally:
                        os.close(sub)
        return total

    def _walk_flat(self, fd: int, grid: list[int]) -> int:
        total = 0
        with os.scandir(fd) as entries:
            for entry in entries:
                parts = entry.name.split(".")
                if (
                    parts[0] == "c"
                    and len(parts) == len(grid) + 1
                    and all(self._index(p, n) for p, n in zip(parts[1:], grid))
                ):
                    total += self._counted(entry)
        return total

    # -- reading ----------------------------------------------------------------------------

    def read(self, target: np.ndarray, ranges: Sequence[range]) -> None:
        """``target[...] = array[ranges..., :, ...]``: ``ranges`` (positive steps, within the shape)
        select along the leading axes, the others are whole; ``target`` is C-contiguous."""
        lead = len(ranges)
        rest = self.shape[lead:]
        if (
            target.dtype != self.dtype
            or not target.flags.c_contiguous
            or target.shape != (*map(len, ranges), *rest)
            or any(r.step <= 0 or (len(r) and (r[0] < 0 or r[-1] >= n)) for r, n in zip(ranges, self.shape))
        ):
            raise ValueError(f"array {self.name!r}: cannot read {ranges} into {target.shape} {target.dtype}")
        if self.chunks[lead:] != tuple(max(1, n) for n in rest):
            raise ValueError(f"array {self.name!r}: its trailing axes are split into chunks")
        if target.size == 0:
            return
        tasks = list(self._tasks(target, ranges))
        top = self._array_dir()
        if top is None:
            target[...] = self.fill
            return
        dirs: dict[tuple[str, ...], int | None] = {(): top}
        try:
            jobs = [(self._directory(dirs, top, path), *task) for path, task in tasks]
            nbytes = target.nbytes
            if len(jobs) > 1 and nbytes >= THREADED_BYTES and THREADS > 1:
                for _ in _threads().map(lambda job: self._read_chunk(*job), jobs):
                    pass
            else:
                for job in jobs:
                    self._read_chunk(*job)
        finally:
            for fd in dirs.values():
                if fd is not None:
                    os.close(fd)

    def _directory(
        self, dirs: dict[tuple[str, ...], int | None], top: int, path: tuple[str, ...]
    ) -> int | None:
        """The directory holding a chunk file (``path``: its names below the array), cached."""
        if path in dirs:
            return dirs[path]
        parent = self._directory(dirs, top, path[:-1])
        fd = None if parent is None else self._open_dir(parent, path[-1], "/".join(path))
        dirs[path] = fd
        return fd

    def _tasks(self, target: np.ndarray, ranges: Sequence[range]) -> Iterator[tuple[tuple[str, ...], tuple]]:
        """Per chunk touched: the directory names below the array, and what ``_read_chunk`` needs."""
        lead = len(ranges)
        per_axis = [list(self._spans(r, self.chunks[a])) for a, r in enumerate(ranges)]
        strides = [math.prod(self.chunks[a + 1 : lead]) for a in range(lead)]  # in rows
        row = math.prod(self.chunks[lead:]) * self.dtype.itemsize
        trailing = (0,) * (len(self.shape) - lead)

        def combos(a: int) -> Iterator[list[tuple[int, slice, range]]]:
            if a == lead:
                yield []
                return
            for span in per_axis[a]:
                for tail in combos(a + 1):
                    yield [span, *tail]

        for combo in combos(0):
            index = [j for j, _, _ in combo] + list(trailing)
            key = self.key(index)
            names = key.split("/")
            out = tuple(o for _, o, _ in combo)
            inside = [r for _, _, r in combo]
            direct = inside[-1].step == 1 and all(len(r) == 1 for r in inside[:-1])
            offset = sum(r[0] * s for r, s in zip(inside, strides)) * row if direct else 0
            yield tuple(names[:-1]), (names[-1], key, target[out], inside, offset, direct)

    @staticmethod
    def _spans(r: range, chunk: int) -> Iterator[tuple[int, slice, range]]:
        """The chunks ``r`` touches along one axis: index, positions in ``r``, indices within the chunk."""
        pos = 0
        while pos < len(r):
            j = r[pos] // chunk
            end = (j + 1) * chunk  # first index past chunk j
            n = len(range(r[pos], min(end, r[-1] + 1), r.step))
            yield j, slice(pos, pos + n), range(r[pos] - j * chunk, r[pos] - j * chunk + n * r.step, r.step)
            pos += n

    def _read_chunk(
        self,
        fd_dir: int | None,
        name: str,
        key: str,
        region: np.ndarray,
        inside: list[range],
        offset: int,
        direct: bool,
    ) -> None:
        """Read one chunk's part ``inside`` into ``region`` (a view of the target)."""
        fd = None
        if fd_dir is not None:
            try:
                fd = os.open(name, _FILE_FLAGS, dir_fd=fd_dir)
            except FileNotFoundError:
                pass
            except OSError as error:
                if error.errno in (errno.ELOOP, errno.EMLINK):
                    raise refused(f"array {self.name!r}", f"chunk {key}", "a symbolic link") from error
                raise
        if fd is None:  # never written: the fill value, as zarr reads it
            region[...] = self.fill
            return
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise refused(
                    f"array {self.name!r}", f"chunk {key}", "a FIFO, device or other non-regular file"
                )
            if info.st_size != self.chunk_nbytes:
                raise FileFormatError(
                    f"array {self.name!r}: chunk {key!r} holds {info.st_size} bytes; an uncompressed "
                    f"chunk {self.chunks} of {self.dtype} has {self.chunk_nbytes} (a damaged store)"
                )
            if direct and region.flags.c_contiguous:
                self._pread(fd, key, region.reshape(-1).view(np.uint8), offset)
            else:
                whole = np.empty(self.chunks, self.dtype)
                self._pread(fd, key, whole.reshape(-1).view(np.uint8), 0)
                region[...] = whole[tuple(slice(r.start, r.stop, r.step) for r in inside)]
        finally:
            os.close(fd)

    def _pread(self, fd: int, key: str, buffer: np.ndarray, offset: int) -> None:
        view, done = buffer.data, 0
        while done < len(view):
            got = os.preadv(fd, [view[done:]], offset + done)
            if got <= 0:
                raise FileFormatError(f"array {self.name!r}: chunk {key!r} ended while it was read")
            done += got
