"""The arrays a :class:`jaxsave.ZarrCollector` writes, in the schema of :mod:`jaxsave._store.schema`.

* One array per leaf, ``posterior/<name>`` or ``sample_stats/<name>``, shaped
  ``(chain, draw, ...)`` with ``dimension_names`` ``["chain", "draw", "<name>_dim_0", ...]``,
  about :data:`CHUNK_BYTES` per chunk (:func:`chunk_shape`). A store written by several
  writers has one chain per chunk (chains never share a chunk, so writers of different
  chains never write the same key); a store with one writer puts the chains it has when it
  creates the arrays into one chunk when their rows are small (64 chains of 10 floats: one
  key a block and leaf, not 64).
* ``sample_counts``: int64, ``(chain,)``, chunked along ``chain`` like the leaves, written
  after the data chunks it counts.
* Checkpoints: raw keys ``sample_counts/jaxsave_checkpoints/<first chain>`` (inside the
  counts array's prefix, where no Zarr reader lists keys: they stay invisible to xarray
  and ArviZ), one per writer, each replaced whole.

Growing the draw or chain axis rewrites metadata only; shrinking deletes the chunks
outside, so :meth:`StoreArrays.resize` first checks that the store still has the shape
this writer last gave it (:class:`jaxsave.FileChangedError` otherwise).

Uncompressed arrays (codec chain exactly ``bytes``) are written a chunk at a time by
:meth:`StoreArrays.write_chunks`: the chunk's bytes encoded by numpy and one put per chunk
(:func:`jaxsave._store.zarr.store.put_keys`: a local store's as plain file writes in the
writer's thread, any other's through zarr's ``store.set``, all of a block at once), and so
are the counts' chunks. :class:`PartialChunks` keeps the rows of a chunk not yet full on the host, from the
chunk's first draw, so that the chunk is written whole (padded with the fill value) at each
commit and never read back, except once, when a writer continues a chunk it did not start
(resume, ``mode="a"``).
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxsave._core import dtypes as _dtypes
from jaxsave._store import schema
from jaxsave._store.zarr.store import put_keys, require_zarr
from jaxsave.collectors import SampleLayout
from jaxsave.errors import FileChangedError, FileFormatError

#: Target bytes of one chunk (one chain or several, a span of draws).
CHUNK_BYTES = 1 * 2**20
#: Chains share a chunk only if it then still spans at least this many draws.
MIN_SHARED_CHUNK_DRAWS = 256
#: At most this many draws in a chunk.
MAX_CHUNK_DRAWS = 4096
#: Where the checkpoints are, below the root group (``+ str(first chain)``).
CHECKPOINT_PREFIX = f"{schema.COUNTS}/jaxsave_checkpoints/"
#: zarr skips chunks that equal the fill value (zeros, NaN); the readers' size guard would then
#: take a long run of such draws for declared, unstored data. Every chunk written is stored.
_WRITE_EVERY_CHUNK = {"write_empty_chunks": True}
#: Compression names ``ZarrCollector(compression=...)`` takes (or any zarr codec object).
COMPRESSIONS = ("zstd", "gzip", "blosc")


#: The most bytes one chunk of an array may decode to, unless one draw of all its chains is more
#: (jaxsave writes chunks of about :data:`CHUNK_BYTES`, or of one draw of big leaves).
MAX_CHUNK_BYTES = 16 * CHUNK_BYTES


def check_chunks(array: Any, name: str) -> None:
    """Refuse an array whose chunks decode to far more than it holds (:data:`MAX_CHUNK_BYTES`).

    A reader decodes whole chunks: a small store can declare a small array in a chunk of
    gigabytes, one zstd frame of a few kB, and every read of it allocates the whole chunk.
    """
    try:
        chunks, shape = tuple(int(n) for n in array.chunks), tuple(int(n) for n in array.shape)
    except (TypeError, ValueError, NotImplementedError) as error:
        raise FileFormatError(f"array {name!r} has a chunk grid jaxsave does not read: {error}") from error
    itemsize = np.dtype(array.dtype).itemsize
    decoded = itemsize * math.prod(chunks)
    one_draw = itemsize * math.prod(1 if axis == 1 else max(1, n) for axis, n in enumerate(shape))
    if decoded > max(MAX_CHUNK_BYTES, one_draw):
        raise FileFormatError(
            f"array {name!r} of shape {shape} has chunks of shape {chunks}: each decodes to "
            f"{decoded:,} bytes, more than {MAX_CHUNK_BYTES:,} (a damaged or hostile store)"
        )


def compressors(compression: Any) -> Any:
    """zarr's ``compressors=`` for a :data:`COMPRESSIONS` name, a codec object or ``None``."""
    if compression is None:
        return None
    zarr = require_zarr()
    if isinstance(compression, str):
        codecs = {
            "zstd": zarr.codecs.ZstdCodec,
            "gzip": zarr.codecs.GzipCodec,
            "blosc": zarr.codecs.BloscCodec,
        }
        return [codecs[compression]()]
    return [compression]


def chunk_draws(layout: SampleLayout, largest: int | None, chains: int = 1) -> int:
    """Draws per chunk of ``chains`` chains: about :data:`CHUNK_BYTES` of the widest leaf's
    rows, at most :data:`MAX_CHUNK_DRAWS`, at most the ``largest`` known chain length."""
    widest = max((layout.row_bytes(j) for j in range(len(layout.specs))), default=1)
    rows = min(MAX_CHUNK_DRAWS, max(1, CHUNK_BYTES // max(1, widest * chains)))
    return max(1, min(rows, largest)) if largest else rows


def chunk_shape(layout: SampleLayout, largest: int | None, chains: int, one_writer: bool) -> tuple[int, int]:
    """``(chains, draws)`` of a chunk: all ``chains`` in one chunk if there is ``one_writer`` and
    the chunk still spans :data:`MIN_SHARED_CHUNK_DRAWS` draws (a power of two of them, so that
    blocks of a power-of-two size fill whole chunks), else one chain.

    >>> import jax, jax.numpy as jnp
    >>> from jaxsave.collectors import sample_layout
    >>> small = sample_layout({"x": jax.ShapeDtypeStruct((10,), jnp.float32)})
    >>> chunk_shape(small, None, 64, True), chunk_shape(small, None, 64, False)
    ((64, 256), (1, 4096))
    """
    draws = chunk_draws(layout, None, chains)
    if not one_writer or chains < 2 or draws < MIN_SHARED_CHUNK_DRAWS:
        return 1, chunk_draws(layout, largest)
    draws = 2 ** int(math.log2(draws))
    return chains, max(1, min(draws, largest)) if largest else draws


def _async(array: Any) -> Any:
    """The ``AsyncArray`` behind a ``zarr.Array`` (public as ``async_array`` from zarr 3.1.5)."""
    return getattr(array, "async_array", None) or array._async_array


def sync(coroutine: Any) -> Any:
    from zarr.core.sync import sync as zarr_sync

    return zarr_sync(coroutine)


def resize(array: Any, shape: tuple[int, ...]) -> None:
    """Give ``array`` ``shape``, deleting its stored chunks outside it.

    zarr's own ``resize`` visits every chunk of the old grid (a store of ``draws=2**40``:
    hours, and a hostile store's declared shape as long); this lists the chunks stored.
    """
    old = tuple(int(n) for n in array.shape)
    if all(new >= was for new, was in zip(shape, old)):
        sync(_async(array).resize(shape, delete_outside_chunks=False))
        return
    encoding = array.metadata.chunk_key_encoding
    grid = [-(-n // c) for n, c in zip(shape, getattr(array, "shards", None) or array.chunks)]
    store, path = array.store_path.store, array.store_path.path
    prefix = f"{path}/" if path else ""

    def outside(key: str) -> bool:
        parts = key[len(prefix) :].split(encoding.separator)
        if encoding.name == "default":
            if parts[0] != "c":
                return False
            parts = parts[1:]
        if len(parts) != len(grid) or not all(p.isascii() and p.isdigit() for p in parts):
            return False  # zarr.json, a checkpoint, another array's prefix
        return any(int(p) >= n for p, n in zip(parts, grid))

    async def delete() -> None:
        doomed = [key async for key in store.list_prefix(prefix) if outside(key)]
        for k in range(0, len(doomed), 256):  # bounded concurrency, for object storage
            await asyncio.gather(*(store.delete(key) for key in doomed[k : k + 256]))

    sync(delete())  # first, as zarr does: a failed delete leaves the shape to cut again
    sync(_async(array).resize(shape, delete_outside_chunks=False))


def counts_path() -> str:
    return schema.COUNTS


def raw_chunks(array: Any) -> bool:
    """Whether ``array``'s chunks are its C-order bytes (codec chain exactly ``bytes``, regular grid)."""
    from zarr.codecs import BytesCodec

    metadata = array.metadata
    codecs: tuple[Any, ...] = tuple(getattr(metadata, "codecs", ()))
    grid = getattr(metadata, "chunk_grid", None)
    return (
        getattr(metadata, "zarr_format", None) == 3
        and len(codecs) == 1
        and type(codecs[0]) is BytesCodec
        and tuple(getattr(grid, "chunk_shape", ())) == tuple(array.chunks)
    )


def chunk_dtype(array: Any) -> np.dtype:
    """The numpy dtype, in the byte order of its ``bytes`` codec, of ``array``'s chunk bytes."""
    endian = array.metadata.codecs[0].endian
    endian = getattr(endian, "value", endian)  # an enum in zarr 3.1, a string later
    dtype = np.dtype(array.dtype)
    return dtype if endian is None else dtype.newbyteorder("<" if endian == "little" else ">")


class StoreArrays:
    """The leaf arrays and the counts array of one store, bound to open zarr arrays."""

    def __init__(self, group: Any, entries: Sequence[tuple[str, str]], layout: SampleLayout):
        self.group, self.entries, self.layout = group, list(entries), layout
        self.leaves: list[Any] = []
        self.counts: Any = None
        #: Rows of chunks not yet full, kept by :meth:`stage` (raw arrays only).
        self.partial = PartialChunks(self)
        self._raw: bool | None = None

    @property
    def raw(self) -> bool:
        """Whether every leaf array takes :meth:`write_chunks` (uncompressed, bytes in C order)."""
        if self._raw is None:
            self._raw = bool(self.leaves) and all(raw_chunks(a) for a in self.leaves)
        return self._raw

    @property
    def bound(self) -> bool:
        return self.counts is not None

    @property
    def shape(self) -> tuple[int, int]:
        """``(chains, draws)`` that every leaf array holds (the shortest leaf's draws: a writer
        killed while it resized the leaves, one ``zarr.json`` each, leaves them unequal)."""
        if not self.leaves:
            return (self.counts.shape[0], 0)
        return (int(self.leaves[0].shape[0]), min(int(a.shape[1]) for a in self.leaves))

    @property
    def aligned(self) -> bool:
        """Whether every leaf array has the same ``(chains, draws)``."""
        return len({tuple(a.shape[:2]) for a in self.leaves}) <= 1

    @property
    def chunk_draws(self) -> int:
        """Draws per chunk of the leaf arrays (all leaves have the same)."""
        return int(self.leaves[0].chunks[1]) if self.leaves else 1

    @property
    def chunk_chains(self) -> int:
        """Chains per chunk of the leaf arrays (1 in a store of several writers)."""
        return int(self.leaves[0].chunks[0]) if self.leaves else 1

    def paths(self) -> list[str]:
        return [schema.posterior_dataset(g, name) for g, name in self.entries]

    def create(self, chains: int, draws: int, chunk: tuple[int, int], compression: Any) -> None:
        """Create the groups, the leaf arrays ``(chains, draws, ...)`` and the counts array,
        chunked ``chunk`` (chains, draws) along the first two axes."""
        codecs = compressors(compression)
        for group_name in dict.fromkeys(g for g, _ in self.entries):
            if group_name not in self.group:
                self.group.create_group(group_name)
        leaves = []
        for j, (group_name, name) in enumerate(self.entries):
            spec, shape = self.layout.specs[j], self.layout.storage_shape(j)
            dtype = _dtypes.storage_dtype(spec.dtype)
            fill = schema.stored_fill_value(dtype)
            leaves.append(
                self.group[group_name]
                .create_array(
                    name,
                    shape=(chains, draws, *shape),
                    chunks=(*chunk, *(max(1, n) for n in shape)),
                    dtype=dtype,
                    fill_value=0 if fill is None else fill[()],
                    compressors=codecs,
                    dimension_names=[schema.CHAIN_DIM, schema.DRAW_DIM]
                    + [schema.dim_name(name, k) for k in range(len(shape))],
                    attributes={
                        schema.LEAF_DTYPE: spec.dtype,
                        schema.LEAF_KEY: json.dumps(list(self.layout.keys[j])),
                    },
                    overwrite=True,
                )
                .with_config(_WRITE_EVERY_CHUNK)
            )
        # The counts last: a store whose counts array exists has all its leaf arrays.
        self.counts = self.group.create_array(
            counts_path(),
            shape=(chains,),
            chunks=(chunk[0],),
            dtype=np.int64,
            fill_value=0,
            compressors=None,
            dimension_names=[schema.CHAIN_DIM],
            overwrite=True,
        )
        self.leaves = leaves

    def bind(self) -> bool:
        """Open the arrays that exist (``False`` if the counts array does not, yet)."""
        try:
            return self._bind()
        except (FileFormatError, FileChangedError):
            raise
        except Exception as error:  # zarr's many errors for damaged metadata
            raise FileFormatError(
                f"the store's arrays cannot be opened ({type(error).__name__}: {error})"
            ) from error

    def _bind(self) -> bool:
        zarr = require_zarr()
        try:
            counts = self.group[counts_path()]
        except KeyError:
            return False
        check_chunks(counts, counts_path())
        leaves = []
        for path, j in zip(self.paths(), range(len(self.entries))):
            node = self.group.get(path)
            if not isinstance(node, zarr.Array):
                raise FileFormatError(f"the store has {schema.COUNTS!r} but no array {path!r}")
            want = (self.layout.storage_shape(j), _dtypes.storage_dtype(self.layout.specs[j].dtype))
            if tuple(node.shape[2:]) != want[0] or node.dtype != want[1] or node.shape[0] != counts.shape[0]:
                raise FileFormatError(
                    f"the store's array {path!r} is {node.shape} of {node.dtype}; this sampler's "
                    f"leaf needs (chains, draws, *{want[0]}) of {want[1]}"
                )
            check_chunks(node, path)  # a chunk it continues is read back once
            leaves.append(node.with_config(_WRITE_EVERY_CHUNK))
        self.leaves, self.counts, self._raw = leaves, counts, None
        return True

    def resize(self, chains: int, draws: int) -> None:
        """Give every leaf array ``(chains, draws, ...)`` and the counts ``(chains,)``; refuses
        when another writer changed a shape since (a shrink would delete its chunks)."""
        zarr = require_zarr()
        for array in [*self.leaves, self.counts]:
            stored = zarr.open_array(store=self.group.store, path=array.path, mode="r").shape
            if tuple(stored) != tuple(array.shape):
                raise FileChangedError(
                    f"the array {array.path!r} of the store is {tuple(stored)} now; this writer made it "
                    f"{tuple(array.shape)}: another writer changes the store (one writer may grow it)"
                )
        if self.counts.shape[0] != chains:  # a padded chunk at the old chain edge would cover new chains
            self.partial.write(drop=True)
        for array in self.leaves:
            if tuple(array.shape[:2]) != (chains, draws):
                resize(array, (chains, draws, *array.shape[2:]))
        if self.counts.shape[0] != chains:
            resize(self.counts, (chains,))

    def write(self, first: int, start: int, values: Sequence[np.ndarray]) -> None:
        """Rows ``values[j]`` ``(chains, n, ...)`` of chains ``first...`` at draws ``start...``."""
        chains, n = values[0].shape[:2]
        for array in self.leaves:  # zarr clips a slice past the end: the rows would be lost unsaid
            if first + chains > array.shape[0] or start + n > array.shape[1]:
                raise FileChangedError(
                    f"the array {array.path!r} of the store is {tuple(array.shape)}: too small for draws "
                    f"{start}..{start + n} of chains {first}..{first + chains}"
                )
        selection = (slice(first, first + chains), slice(start, start + n))
        writes = [
            _async(array).setitem(selection, _dtypes.to_storable(rows))
            for array, rows in zip(self.leaves, values)
            if math.prod(rows.shape)
        ]

        async def every() -> None:  # the leaves' chunks at once, not one leaf after the other
            await asyncio.gather(*writes)

        sync(every())

    def whole_chains(self, first: int, chains: int) -> bool:
        """Whether chains ``first...first + chains - 1`` are whole chunks along the chain axis (the
        last one may end at the axis' end)."""
        cc = self.chunk_chains
        return first % cc == 0 and (chains % cc == 0 or first + chains >= self.shape[0])

    def write_chunks(self, first: int, start: int, values: Sequence[np.ndarray]) -> int:
        """Write the chunks that rows ``values[j]`` ``(chains, n, ...)`` of chains ``first...`` at draws
        ``start...`` cover, each whole: one put a chunk (:func:`put_keys`), no chunk read.

        ``start`` is a chunk's first draw and the chains are :meth:`whole_chains`; a chunk the rows
        fill only in part is padded with the fill value (so: only where nothing else is stored,
        the draws past a chain's count or the chains past the axis' end). Returns the keys written.
        """
        cc, cd = self.chunk_chains, self.chunk_draws
        chains, n = values[0].shape[:2]
        if start % cd or not self.whole_chains(first, chains):
            raise ValueError(
                f"rows of chains {first}+{chains} at draw {start} do not start whole chunks of "
                f"{cc} chains x {cd} draws"
            )
        puts: list[tuple[str, np.ndarray]] = []
        for array, rows in zip(self.leaves, values):
            rows = _dtypes.to_storable(rows)
            if not math.prod(rows.shape):
                continue
            dtype, inner = chunk_dtype(array), tuple(array.chunks[2:])
            path = array.store_path.path
            zeros = (0,) * len(inner)
            for c0 in range(0, chains, cc):
                for d0 in range(0, n, cd):
                    part = rows[c0 : c0 + cc, d0 : d0 + cd]
                    if part.shape[:2] != (cc, cd):
                        full = np.full((cc, cd, *inner), array.metadata.fill_value, dtype)
                        full[: part.shape[0], : part.shape[1]] = part
                        part = full
                    data = np.ascontiguousarray(part, dtype=dtype).reshape(-1).view(np.uint8)
                    key = array.metadata.encode_chunk_key(((first + c0) // cc, (start + d0) // cd, *zeros))
                    puts.append((f"{path}/{key}" if path else key, data))
        if puts:  # the leaves share the group's store
            put_keys(self.leaves[0].store_path.store, puts)
        return len(puts)

    def read(self, first: int, chains: int, start: int, stop: int) -> list[np.ndarray]:
        """The stored rows of chains ``first...`` at draws ``start...stop - 1``, per leaf."""
        selection = (slice(first, first + chains), slice(start, stop))
        return [np.asarray(array[selection]) for array in self.leaves]

    def write_counts(self, counts: dict[int, int], known: dict[int, int] | None = None) -> None:
        """Store ``{chain: count}``. A chunk of the counts array whose chains all have a count in
        ``known`` (this writer's counts, ``counts`` among them) is written whole, as its raw bytes
        (one put, no zarr pipeline); other chains by zarr, contiguous runs in one call."""
        known = counts if known is None else known
        rest = counts
        if raw_chunks(self.counts):
            rest = {}
            cc, total = int(self.counts.chunks[0]), int(self.counts.shape[0])
            dtype, path = chunk_dtype(self.counts), self.counts.store_path.path
            puts: list[tuple[str, np.ndarray]] = []
            for k in sorted({c // cc for c in counts}):
                chains = range(k * cc, min((k + 1) * cc, total))
                if not all(c in known for c in chains):
                    rest.update({c: counts[c] for c in chains if c in counts})
                    continue
                data = np.zeros(cc, dtype)  # past the axis' end: the fill value, 0
                data[: len(chains)] = [known[c] for c in chains]
                key = self.counts.metadata.encode_chunk_key((k,))
                puts.append((f"{path}/{key}" if path else key, data.view(np.uint8)))
            put_keys(self.counts.store_path.store, puts)
        runs: list[list[int]] = []
        for c in sorted(rest):
            if runs and runs[-1][-1] == c - 1:
                runs[-1].append(c)
            else:
                runs.append([c])
        for run in runs:
            self.counts[run[0] : run[-1] + 1] = np.array([rest[c] for c in run], np.int64)


class PartialChunks:
    """Rows of chunks not yet full, per run of chains ``(first, chains)``: from the chunk's first
    draw to the chains' count, so that :meth:`write` writes the chunk whole, without reading it."""

    def __init__(self, arrays: StoreArrays):
        self.arrays = arrays
        #: ``(first, chains)``: ``[chunk's first draw, draws, [rows per leaf, ...], not written yet]``.
        self.runs: dict[tuple[int, int], list[Any]] = {}

    def covers(self, first: int, chains: int) -> list[tuple[int, int]]:
        """The runs that share a chain with chains ``first...first + chains - 1``."""
        return [(f, k) for f, k in self.runs if f < first + chains and first < f + k]

    def add(self, first: int, start: int, values: Sequence[np.ndarray], head: Any) -> int:
        """Rows ``values`` of chains ``first...`` at draws ``start...``: the chunks they complete
        are written, the rest kept (a copy: the writer reuses the block's memory). ``head()``
        reads the stored start of a chunk this writer did not keep (called only then). Returns
        the keys written."""
        cd = self.arrays.chunk_draws
        chains, n = values[0].shape[:2]
        key = (first, chains)
        # A run leaves ``runs`` only once its rows are written: a failed write (a full disk)
        # keeps every row the counts may count, for the commit that comes next.
        run = self.runs.get(key)
        if run is not None and run[0] + run[1] != start:  # not where these rows continue
            self.write([key], drop=True)
            run = None
        for other in self.covers(first, chains):  # another grouping of these chains: written first
            if other != key:
                self.write([other], drop=True)
        if run is None:
            begin = start - start % cd
            run = [begin, start - begin, [head(first, chains, begin, start)] if begin < start else [], True]
        begin, pieces = run[0], run[2]
        total = start + n - begin
        whole = total - total % cd
        if not whole:  # no chunk completed: keep the rows, join them at the commit
            self.runs[key] = [begin, total, [*pieces, [np.array(v) for v in values]], True]
            return 0
        rows = list(values)
        if pieces:
            rows = [np.concatenate([*(p[j] for p in pieces), values[j]], 1) for j in range(len(values))]
        written = self.arrays.write_chunks(first, begin, [r[:, :whole] for r in rows])
        if whole < total:
            self.runs[key] = [begin + whole, total - whole, [[np.array(r[:, whole:]) for r in rows]], True]
        else:
            self.runs.pop(key, None)
        return written

    def write(self, which: Sequence[tuple[int, int]] | None = None, drop: bool = False) -> int:
        """Write the kept runs (``which``, or all) not written since they changed, as whole chunks
        padded with the fill value; ``drop`` forgets them once written. Returns the keys written."""
        written = 0
        for key in list(self.runs) if which is None else which:
            run = self.runs[key]
            if run[3]:
                pieces = run[2]
                if len(pieces) > 1:
                    pieces[:] = [[np.concatenate([p[j] for p in pieces], 1) for j in range(len(pieces[0]))]]
                written += self.arrays.write_chunks(key[0], run[0], pieces[0])
                run[3] = False
            if drop:
                del self.runs[key]
        return written

    def forget(self, chains: Sequence[int]) -> None:
        """Drop the runs holding any of ``chains`` (written already: their counts change)."""
        for c in chains:
            for key in self.covers(c, 1):
                self.runs.pop(key, None)
