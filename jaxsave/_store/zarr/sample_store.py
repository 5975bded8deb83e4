"""The Zarr sample store, read side: open it, check its header, read its schema and its leaves.

Implements :class:`jaxsave._store.source.SampleSource` for :mod:`jaxsave.samples`. Every
failure of the store itself (missing or malformed metadata, arrays unlike the structure,
keys zarr cannot decode) becomes a :class:`jaxsave.FileFormatError`.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from jaxsave._core import dtypes as _dtypes
from jaxsave._store import schema
from jaxsave._store.location import ZARR_JSON, describe
from jaxsave._store.schema import VariableInfo
from jaxsave._store.zarr.arrays import check_chunks, counts_path, resize, sync
from jaxsave._store.zarr.chunk_files import ChunkFiles, chunk_files, local_chunk_files
from jaxsave._store.zarr.confined import stat_confined
from jaxsave._store.zarr.store import Location, has_key, open_group, require_zarr
from jaxsave.errors import FileFormatError, JaxsaveError

#: Compressed chunks may hold this many times fewer bytes than they decode to (a bound for
#: :meth:`ZarrSource.stored_bytes`): zstd's most (an RLE block, 4 bytes for 128 KiB), above
#: deflate's 1032:1 and blosc's.
MAX_EXPANSION = 33_000


def _ranges(selection: Any, shape: tuple[int, ...]) -> tuple[list[range], tuple[int, ...]] | None:
    """The leading-axis ranges of ``selection`` (ints and forward slices only) and the shape
    they read with the axes of ints kept (length 1), or ``None`` for anything else."""
    items = selection if isinstance(selection, tuple) else (selection,)
    if len(items) > len(shape):
        return None
    ranges = []
    for item, n in zip(items, shape):
        if isinstance(item, (int, np.integer)) and not isinstance(item, bool):
            i = int(item) + (n if item < 0 else 0)
            if not 0 <= i < n:
                return None
            ranges.append(range(i, i + 1))
        elif isinstance(item, slice) and (item.step is None or item.step > 0):
            ranges.append(range(*item.indices(n)))
        else:
            return None
    return ranges, (*map(len, ranges), *shape[len(ranges) :])


class ZarrLeaf:
    """One leaf array, as the readers use it: shape, dtype, slicing and ``read_direct``.

    A local array of uncompressed chunks is read by :mod:`jaxsave._store.zarr.chunk_files`
    (plain file reads into the result), any other by zarr."""

    def __init__(self, array: Any, name: str):
        check_chunks(array, name)
        self._array, self.name = array, name
        self._open: Callable[[], Any] = lambda: array
        self.shape: tuple[int, ...] = tuple(array.shape)
        self.dtype = np.dtype(array.dtype)
        self.ndim = len(self.shape)
        self.files: ChunkFiles | None = chunk_files(array)

    @classmethod
    def direct(cls, files: ChunkFiles, open_array: Callable[[], Any], name: str) -> ZarrLeaf:
        """A leaf read by ``files`` alone; zarr opens it (``open_array()``) only if a read needs it."""
        leaf = cls.__new__(cls)
        leaf._array, leaf._open, leaf.name, leaf.files = None, open_array, name, files
        leaf.shape, leaf.dtype, leaf.ndim = files.shape, files.dtype, len(files.shape)
        return leaf

    @property
    def array(self) -> Any:
        """The ``zarr.Array`` (opened now if the leaf was made by :meth:`direct`)."""
        if self._array is None:
            self._array = self._open()
        return self._array

    def _direct(self, selection: Any) -> tuple[list[range], tuple[int, ...]] | None:
        if self.files is None:
            return None
        parsed = _ranges(selection, self.shape)
        if parsed is None or self.files.chunks[len(parsed[0]) :] != tuple(
            max(1, n) for n in self.shape[len(parsed[0]) :]
        ):
            return None
        return parsed

    def __getitem__(self, selection: Any) -> np.ndarray:
        direct = self._direct(selection)
        if direct is None or self.files is None:
            return np.asarray(self.array[selection])
        ranges, shape = direct
        out = np.empty(shape, self.dtype)
        self.files.read(out, ranges)
        items = selection if isinstance(selection, tuple) else (selection,)
        return out[tuple(0 if not isinstance(i, slice) else slice(None) for i in items)]

    def read_direct(self, out: np.ndarray, source: Any, dest: Any = None) -> None:
        """``out[dest] = self[source]``, decoded straight into ``out`` (no temporary array)."""
        from zarr.core.buffer import default_buffer_prototype

        target = out if dest is None else out[dest]
        direct = self._direct(source)
        if (
            direct is not None
            and self.files is not None
            and target.flags.c_contiguous
            and np.shares_memory(target, out)
            and target.size == math.prod(direct[1])
        ):
            self.files.read(target.reshape(direct[1]), direct[0])
            return
        if not np.shares_memory(target, out) or not target.flags.c_contiguous:
            target[...] = self.array[source]
            return
        self.array.get_basic_selection(
            source, out=default_buffer_prototype().nd_buffer.from_numpy_array(target)
        )

    def stored_bytes(self) -> int:
        """The bytes of the array's chunks in the store (one directory walk for a local one)."""
        if self.files is not None:
            return self.files.stored_bytes()
        return max(0, int(self.array.nbytes_stored()) - _metadata_bytes(self.array))

    @property
    def compressed(self) -> bool:
        return self.files is None and bool(getattr(self.array, "compressors", ()))


def _metadata_bytes(array: Any) -> int:
    """The size of ``array``'s ``zarr.json``, which ``nbytes_stored`` counts with its chunks (a
    store padding it with attributes would otherwise back declared draws it does not store)."""
    location = array.store_path
    key = f"{location.path}/{ZARR_JSON}" if location.path else ZARR_JSON
    try:
        return int(sync(location.store.getsize(key)))
    except (OSError, KeyError, ValueError, NotImplementedError):
        return 0


def _attributes(group: Any) -> dict[str, Any]:
    return dict(group.attrs.asdict())


def check_header(attrs: dict[str, Any], name: str) -> None:
    """Refuse a store that is not a sample store this jaxsave can read."""
    fmt = attrs.get(schema.FORMAT)
    if fmt is None:
        raise FileFormatError(f"{name} is a Zarr store but not a jaxsave sample store (no {schema.FORMAT!r})")
    if not isinstance(fmt, int) or isinstance(fmt, bool):
        raise FileFormatError(f"{name} has a malformed {schema.FORMAT!r}: {fmt!r}")
    if fmt > schema.SAMPLE_FILE_FORMAT:
        raise FileFormatError(
            f"{name} has jaxsave format {fmt}; this jaxsave reads up to "
            f"{schema.SAMPLE_FILE_FORMAT}: upgrade jaxsave"
        )
    if attrs.get(schema.LAYOUT) != schema.POSTERIOR:
        raise FileFormatError(f"{name} has an unknown layout {attrs.get(schema.LAYOUT)!r}")


class ZarrSource:
    """A jaxsave Zarr store opened for reading."""

    def __init__(self, group: Any, location: Location, path: str):
        self.group, self.location, self.path = group, location, path
        self.attrs = _attributes(group)
        check_header(self.attrs, location.name)

    def layout(self) -> str:
        return schema.POSTERIOR

    def has_structure(self) -> bool:
        return schema.STRUCTURE in self.attrs

    def structure(self) -> str:
        return str(self.attrs[schema.STRUCTURE])

    def variables(self) -> list[VariableInfo]:
        raw = self.attrs.get(schema.STRUCTURE)
        if raw is None:
            raise FileFormatError("the store holds no samples yet (no chain was registered)")
        if not isinstance(raw, str):
            raise FileFormatError(f"the store's {schema.STRUCTURE!r} attribute is not a string")
        try:
            out = schema.parse_structure(raw)
        except (ValueError, KeyError, TypeError) as error:
            raise FileFormatError(
                f"the store's {schema.STRUCTURE!r} attribute is malformed: {error}"
            ) from error
        for v in out:
            _dtypes.storage_dtype(v.dtype)  # whitelisted dtype names only
        return out

    def counts(self) -> np.ndarray:
        """Each chain's sample count (read before the leaves: they hold at least these draws)."""
        files = None if self.location.local is None else local_chunk_files(self.location.local, counts_path())
        if files is not None:
            if len(files.shape) != 1 or files.dtype.kind not in "iu":
                raise FileFormatError(f"the store's {schema.COUNTS!r} is not a 1-d integer array")
            raw = np.empty(files.shape, files.dtype)
            files.read(raw, [range(files.shape[0])])
            return self._checked_counts(raw)
        zarr = require_zarr()
        node = self.group.get(counts_path())
        if node is None and has_key(self.location, f"{counts_path()}/{ZARR_JSON}"):
            # A live writer may have created the counts between the two looks: look again.
            node = self.group.get(counts_path())
            if node is None:
                raise FileFormatError(f"the store's {schema.COUNTS!r} has metadata zarr cannot read")
        if node is None:
            return np.zeros(0, np.int64)  # created, no block written yet
        if not isinstance(node, zarr.Array) or node.ndim != 1 or np.dtype(node.dtype).kind not in "iu":
            raise FileFormatError(f"the store's {schema.COUNTS!r} is not a 1-d integer array")
        return self._checked_counts(ZarrLeaf(node, counts_path())[:])

    def _checked_counts(self, raw: np.ndarray) -> np.ndarray:
        return schema.checked_counts(raw, self.location.name)

    def dataset(self, layout: str, var: VariableInfo, chain: int | None = None) -> ZarrLeaf:
        path = schema.dataset_path(layout, var, chain)
        files = None if self.location.local is None else local_chunk_files(self.location.local, path)
        if files is not None:  # its zarr.json read directly: no zarr call unless a read needs one
            return ZarrLeaf.direct(files, lambda: self._array(path), path)
        return ZarrLeaf(self._array(path), path)

    def _array(self, path: str) -> Any:
        zarr = require_zarr()
        node = self.group.get(path)
        if not isinstance(node, zarr.Array):
            raise FileFormatError(f"the store lacks the array {path!r}")
        return node

    def stored_bytes(self, ds: ZarrLeaf) -> int:
        """The bytes of ``ds``'s chunks in the store (times :data:`MAX_EXPANSION` if compressed):
        chunks not written read as the fill value, so a store can declare any shape."""
        return ds.stored_bytes() * (MAX_EXPANSION if ds.compressed else 1)

    def info(self) -> dict[str, Any]:
        return {
            "format": int(self.attrs[schema.FORMAT]),
            "version": str(self.attrs.get(schema.VERSION, "?")),
            "created": str(self.attrs.get(schema.CREATED, "?")),
            "open_for_writing": False,
        }


def _missing(source: Any) -> str | None:
    """Why ``source`` (a local directory) is no Zarr store, or ``None``."""
    from jaxsave._store.zarr.store import local_directory

    local = local_directory(source)
    if local is None or not isinstance(source, (str, os.PathLike)):
        return None
    if not os.path.exists(local):
        return f"no such file or store: {describe(source)}"
    if stat_confined(local, ZARR_JSON) is None:  # refuses a symlink, a FIFO, a device
        return f"{describe(source)} is a directory but not a Zarr store (no {ZARR_JSON})"
    return None


@contextlib.contextmanager
def open_sample_store(source: Any, storage_options: dict | None = None) -> Iterator[ZarrSource]:
    """Open a Zarr sample store for reading; every failure of the store is a :class:`FileFormatError`."""
    zarr = require_zarr()
    problem = _missing(source)
    if problem is not None:
        raise (FileNotFoundError if problem.startswith("no such") else FileFormatError)(problem)
    path = os.fspath(source) if isinstance(source, (str, os.PathLike)) else str(source)
    try:
        group, location = open_group(source, "r", storage_options)
        opened = ZarrSource(group, location, path)
    except (JaxsaveError, ImportError):
        raise
    except (FileNotFoundError, zarr.errors.NodeNotFoundError) as error:
        raise FileNotFoundError(f"no such file or store: {describe(source)}") from error
    except Exception as error:  # zarr raises many kinds on malformed metadata
        raise damaged(source, error) from error
    try:
        yield opened
    except (JaxsaveError, IndexError, ImportError, FileNotFoundError):
        raise
    except Exception as error:  # ... or chunks
        raise damaged(source, error) from error


def damaged(source: Any, error: BaseException) -> FileFormatError:
    """The error for a store that zarr cannot read (``error`` is zarr's)."""
    return FileFormatError(
        f"{describe(source)} is damaged or not a valid jaxsave Zarr store ({type(error).__name__}: {error})"
    )


def align_shapes(source: Any, storage_options: dict | None = None) -> bool:
    """Give every leaf array the store's ``(chains, longest count)`` draws; returns whether one
    changed. A writer killed while it resized its arrays (one ``zarr.json`` each) can leave them
    at different lengths, which xarray refuses in one group; jaxsave's readers do not mind.
    Only for a store no one writes: the chunks past the longest count are deleted."""
    zarr = require_zarr()
    with open_sample_store(source, storage_options) as store:
        counts, variables = store.counts(), store.variables() if store.has_structure() else []
        name = store.location.name
    shape = (len(counts), int(counts.max()) if counts.size else 0)
    changed = False
    try:
        group = open_group(source, "r+", storage_options)[0]
        for var in variables:
            array = group.get(schema.posterior_dataset(var.group, var.name))
            if isinstance(array, zarr.Array) and tuple(array.shape[:2]) != shape:
                resize(array, (*shape, *array.shape[2:]))
                changed = True
    except Exception as error:
        raise FileFormatError(f"{name}: cannot resize its arrays ({error})") from error
    return changed
