"""The HDF5 collector's datasets: created at the first block, grown as draws and chains come.

Layout ``"posterior"``: one ``(chain, draw, ...)`` dataset per leaf under
``posterior/`` or ``sample_stats/``, with ``chain``/``draw``/``<var>_dim_k``
dimension scales. Layout ``"chains"``: one ``(draw, ...)`` dataset per leaf and
chain under ``/chain~{id}/``. Datasets are chunked (about 1 MiB, at most 4096
draws) and resizable; with a known count they are allocated at their final size (at most
16384 draws).
Rows are written by :func:`write_rows` / :func:`write_block`, which hand the
whole chunks of an unfiltered dataset straight to the file.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import h5py
import numpy as np

from jaxsave._core import diskspace as _diskspace
from jaxsave._core import dtypes as _dtypes
from jaxsave._store import schema
from jaxsave._store.hdf5.sample_file import attach_scales
from jaxsave.collectors import SampleLayout

__all__ = ["HDF5Datasets", "write_block", "write_rows"]

#: Target size of one chunk: big enough that reading draws is fast.
_CHUNK_BYTES = 1 * 2**20
#: ... and at most this many draws, so that short runs of small samples stay small files.
_MAX_CHUNK_ROWS = 4096
#: A sample of many small leaves: the chunks of one span of draws, over all leaves, hold about
#: ``_CHUNK_BYTES`` (each leaf's partial last chunk takes its whole size on disk), but each chunk
#: at least this many draws.
_MIN_CHUNK_ROWS = 64
#: A known count preallocates at most this many draws (more are grown as they come): the draw
#: scale is written in full, so an over-estimate would fill the file (or memory) with it.
_MAX_PREALLOC_DRAWS = 16384
#: Chunks at least this big are written whole with ``write_direct_chunk`` when a block covers them:
#: past HDF5's selection and chunk cache, twice as fast (4 MiB: 1.8 ms instead of 3.6 ms on tmpfs).
_DIRECT_CHUNK_BYTES = 256 * 2**10


def _whole_chunks(ds: h5py.Dataset, axis: int, start: int, n: int,
                  dtype: np.dtype) -> tuple[int, int, int] | None:
    """``(lo, hi, rows)``: the chunks of draws ``lo..hi`` (``rows`` each) that a write of draws
    ``start..start+n`` along ``axis`` covers whole and may go to the file directly; ``None`` if none."""
    chunks = ds.chunks  # cheap checks first: this runs for every leaf of every block
    if chunks is None or math.prod(chunks) * dtype.itemsize < _DIRECT_CHUNK_BYTES:
        return None
    rows = chunks[axis]
    lo, hi = -(-start // rows) * rows, (start + n) // rows * rows
    if hi <= lo:
        return None
    shape = ds.shape
    hi = min(hi, shape[axis] // rows * rows)  # a chunk past the extent is not written whole
    if (hi <= lo or dtype != ds.dtype or any(c != 1 for c in chunks[:axis])
            or chunks[axis + 1:] != shape[axis + 1:] or ds.id.get_create_plist().get_nfilters()):
        return None
    return lo, hi, rows


def _write_slab(ds: h5py.Dataset, offset: tuple[int, ...], rows: np.ndarray) -> None:
    """Write ``rows`` into ``ds`` at ``offset`` (one index per axis of ``ds``), through h5py's
    low-level API: about 50 us a call where ``ds[...] = rows`` costs about 200 us."""
    if rows.size == 0:
        return
    rows = np.ascontiguousarray(rows)
    file_space = ds.id.get_space()
    file_space.select_hyperslab(offset, (1,) * (len(offset) - rows.ndim) + rows.shape)
    ds.id.write(h5py.h5s.create_simple(rows.shape), file_space, rows)


def write_rows(ds: h5py.Dataset, lead: tuple[int, ...], start: int, rows: np.ndarray) -> None:
    """``ds[(*lead, slice(start, start + len(rows)))] = rows``, whole chunks written directly."""
    _write_span(ds, lead, start, rows, _whole_chunks(ds, len(lead), start, len(rows), rows.dtype))


def write_block(ds: h5py.Dataset, first: int, start: int, rows: np.ndarray) -> None:
    """``ds[first:first + len(rows), start:start + rows.shape[1]] = rows``.

    That is chains ``first...``, draws ``start...``.
    """
    whole = _whole_chunks(ds, 1, start, rows.shape[1], rows.dtype)  # the same span for every chain
    if whole is None:
        _write_slab(ds, (first, start) + (0,) * (rows.ndim - 2), rows)
        return
    for i, chain_rows in enumerate(rows):
        _write_span(ds, (first + i,), start, chain_rows, whole)


def _write_span(ds: h5py.Dataset, lead: tuple[int, ...], start: int, rows: np.ndarray,
                whole: tuple[int, int, int] | None) -> None:
    """Draws ``start...`` of ``rows``: the chunks ``whole`` (of :func:`_whole_chunks`) directly,
    the rest as slabs."""
    zeros = (0,) * (rows.ndim - 1)
    if whole is None:
        _write_slab(ds, (*lead, start, *zeros), rows)
        return
    lo, hi, size = whole
    _write_slab(ds, (*lead, start, *zeros), rows[:lo - start])
    for k in range(lo, hi, size):
        ds.id.write_direct_chunk((*lead, k, *zeros), np.ascontiguousarray(rows[k - start:k - start + size]))
    _write_slab(ds, (*lead, hi, *zeros), rows[hi - start:])


class HDF5Datasets:
    """Mixin of :class:`jaxsave.HDF5Collector`: creating and growing its datasets, writing rows.

    Uses the collector's file (and its name), layout, sample layout, per-chain
    capacities and counts, its ``_change`` (structural changes outside SWMR mode)
    and ``_write_counts``.
    """

    _file: h5py.File
    _sample: SampleLayout
    _entries: list[tuple[str, str]]
    _capacity: list[int | None]
    _counts: list[int]
    _datasets: list[h5py.Dataset]
    _chain_datasets: dict[int, list[h5py.Dataset]]
    compression: str | None
    _change: Callable[..., None]
    _write_counts: Callable[[], None]
    _filename: str
    layout: str

    def _chunk_rows(self, j: int, largest: int | None = None) -> int:
        """Draws per chunk of leaf ``j``: about 1 MiB, at most 4096, at most the ``largest``
        known count of a chain (computed if not given); for many small leaves, about 1 MiB
        over all leaves (at least 64 draws), so that a short run makes a small file."""
        rows = min(_MAX_CHUNK_ROWS, max(1, _CHUNK_BYTES // max(1, self._sample.row_bytes(j))),
                   max(_MIN_CHUNK_ROWS, _CHUNK_BYTES // max(1, self._sample.row_bytes())))
        if largest is None:
            largest = max((c for c in self._capacity if c), default=0)
        return min(rows, largest) if largest else rows

    def _create(self, group: h5py.Group, name: str, j: int, lead: tuple[int, ...]) -> h5py.Dataset:
        spec = self._sample.specs[j]
        shape = self._sample.storage_shape(j)
        dtype = _dtypes.storage_dtype(spec.dtype)
        chunk_lead = (1,) * (len(lead) - 1) + (self._chunk_rows(j),)
        ds = group.create_dataset(
            name,
            shape=lead + shape,
            maxshape=(None,) * len(lead) + shape,
            dtype=dtype,
            chunks=chunk_lead + shape if math.prod(shape) else None,
            compression=self.compression,
            shuffle=self.compression is not None,
            fillvalue=schema.stored_fill_value(dtype),
        )
        ds.attrs[schema.LEAF_DTYPE] = spec.dtype
        ds.attrs[schema.LEAF_KEY] = json.dumps(list(self._sample.keys[j]))
        return ds

    def _draw_extent(self, chains: list[int], needed: int) -> int:
        caps = [self._capacity[c] for c in chains]
        known = [c for c in caps if c is not None]
        if caps and len(known) == len(caps):
            return max(needed, min(max(known), _MAX_PREALLOC_DRAWS))
        return needed

    def _posterior(self, needed_draws: int) -> list[h5py.Dataset]:
        n_chains = len(self._counts)
        if not self._datasets:
            first_group, first_var = self._entries[0]
            if f"{first_group}/{first_var}" in self._file:  # reopened after close: bind what exists
                self._datasets = [self._file[f"{g}/{v}"] for g, v in self._entries]
            else:
                self._change(lambda: self._create_posterior(n_chains, needed_draws), then_swmr=True)
        if self._datasets[0].shape[0] < n_chains:  # chains registered after the first block
            def grow() -> None:  # on the file _change hands over (a copy): its handles, not ours
                self._resize(n_chains, max(self._datasets[0].shape[1], needed_draws))
                self._write_counts()
            self._change(grow, then_swmr=True)
        ds0 = self._datasets[0]
        if ds0.shape[1] < needed_draws:  # grow by a quarter at least: O(log n) resizes
            self._resize(n_chains, max(needed_draws, ds0.shape[1] + ds0.shape[1] // 4))
        return self._datasets

    def _create_posterior(self, n_chains: int, needed_draws: int) -> None:
        draws = self._draw_extent(list(range(n_chains)), needed_draws)
        for group_name in dict.fromkeys(g for g, _ in self._entries):
            group = self._file.require_group(group_name)
            for name, size in ((schema.CHAIN_DIM, n_chains), (schema.DRAW_DIM, draws)):
                scale = group.create_dataset(name, data=np.arange(size, dtype=np.int64), maxshape=(None,),
                                             chunks=(max(1, min(size, 4096)),) if size else (1,))
                scale.make_scale(name)
        for j, (group_name, var) in enumerate(self._entries):
            group = self._file[group_name]
            ds = self._create(group, var, j, (n_chains, draws))
            attach_scales(group, ds, var)
            self._datasets.append(ds)
        self._write_counts()

    def _resize(self, chains: int, draws: int) -> None:
        for ds in self._datasets:
            ds.resize((chains, draws) + ds.shape[2:])
        for group_name in dict.fromkeys(g for g, _ in self._entries):
            for name, size in ((schema.CHAIN_DIM, chains), (schema.DRAW_DIM, draws)):
                scale = self._file[group_name][name]
                old = scale.shape[0]
                if old != size:
                    scale.resize((size,))
                    if size > old:
                        scale[old:] = np.arange(old, size)

    def _chain_names(self, chain: int) -> list[str]:
        """The paths of chain ``chain``'s datasets (``chains`` layout)."""
        return [schema.chain_dataset(chain, key) for key in self._sample.keys]

    def _rebind(self) -> None:
        """Point the dataset handles at ``self._file``, after it was replaced or reopened.

        Handles into a closed file are dead (h5py closes a file's objects with it), so
        every swap of the file must rebind; the paths come from the layout, not from
        the old handles (whose names are gone with their file).
        """
        if self._datasets:
            self._datasets = [self._file[f"{g}/{v}"] for g, v in self._entries]
        self._chain_datasets = {c: [self._file[n] for n in self._chain_names(c)]
                                for c in self._chain_datasets}

    def _chain_group(self, chain: int, needed: int) -> list[h5py.Dataset]:
        if chain not in self._chain_datasets:
            self._change(lambda: self._create_chain_groups(chain, needed), then_swmr=True)
        dsets = self._chain_datasets[chain]
        if dsets and dsets[0].shape[0] < needed:
            for ds in dsets:
                ds.resize((needed,) + ds.shape[1:])
        return dsets

    def _create_chain_groups(self, chain: int, needed: int) -> None:
        """Datasets of every registered chain at once: a SWMR file cannot get objects later."""
        for c in range(len(self._counts)):
            if c in self._chain_datasets:
                continue
            names = self._chain_names(c)
            if names and names[0] in self._file:  # reopened after close: bind what exists
                self._chain_datasets[c] = [self._file[n] for n in names]
                continue
            group = self._file.require_group(schema.chain_group(c))
            draws = self._draw_extent([c], needed if c == chain else 0)
            dsets = []
            for j, key in enumerate(self._sample.keys):
                parent = group
                for part in key[:-1]:
                    parent = parent.require_group(part)
                dsets.append(self._create(parent, key[-1] if key else schema.BARE_LEAF, j, (draws,)))
            group.attrs[schema.CHAIN_COUNT] = 0
            self._chain_datasets[c] = dsets
        self._write_counts()

    # -- writing rows (writer thread) -------------------------------------------------------

    def _check_rows(self, values: list[np.ndarray], lead: int, chains: int | None = None) -> None:
        """Refuse rows unlike the registered sample: the low-level writes would take them."""
        specs = self._sample.specs if self._sample is not None else []
        if len(values) != len(specs):
            raise TypeError(f"HDF5Collector: got rows of {len(values)} leaves, the sample has {len(specs)}")
        leads = {np.shape(v)[:lead] for v in values}
        if len(leads) > 1 or (chains is not None and leads and next(iter(leads))[0] != chains):
            raise TypeError(f"HDF5Collector: the leaves' rows disagree on their leading (chain, draw) axes: "
                            f"{sorted(leads)}" + (f" for {chains} chains" if chains is not None else ""))
        for j, v in enumerate(values):
            if np.shape(v)[lead:] != self._sample.storage_shape(j):
                raise TypeError(
                    f"HDF5Collector: rows of leaf {schema.leaf_path(self._sample.keys[j])} have "
                    f"shape {np.shape(v)[lead:]}, the sample's is {self._sample.storage_shape(j)}")

    def _write_block(self, chain_ids: list[int], values: list[np.ndarray]) -> None:
        """Rows ``values[j][i]`` of chains ``chain_ids[i]``: one write per leaf where the chains are
        consecutive and level in a ``posterior`` file, else chain by chain."""
        first, starts = chain_ids[0], {self._counts[c] for c in chain_ids}
        contiguous = chain_ids == list(range(first, first + len(chain_ids)))
        if self.layout != schema.POSTERIOR or not contiguous or len(starts) != 1:
            for i, chain in enumerate(chain_ids):
                self._write_rows(chain, [leaf[i] for leaf in values])
            return
        start, n = starts.pop(), values[0].shape[1] if values else 0
        self._check_space(len(chain_ids), values)
        dsets = self._posterior(start + n)
        for ds, rows in zip(dsets, values):
            write_block(ds, first, start, _dtypes.to_storable(rows))
        for chain in chain_ids:
            self._counts[chain] += n

    def _write_rows(self, chain: int, values: list[np.ndarray]) -> None:
        start, n = self._counts[chain], len(values[0]) if values else 0
        self._check_space(1, values)
        dsets = (self._posterior(start + n) if self.layout == schema.POSTERIOR
                 else self._chain_group(chain, start + n))
        lead = (chain,) if self.layout == schema.POSTERIOR else ()
        for ds, rows in zip(dsets, values):
            write_rows(ds, lead, start, _dtypes.to_storable(rows))
        self._counts[chain] += n

    def _check_space(self, chains: int, values: list[np.ndarray]) -> None:
        """Refuse a block the disk may not have room for, before HDF5 sees it, datasets not
        even grown (see :mod:`jaxsave._core.diskspace`).

        Room is needed for the block, a chunk per dataset and chain it may newly
        allocate and one still in the chunk cache.
        """
        if self._file.driver not in ("sec2", "stdio"):
            return
        largest = max((c for c in self._capacity if c), default=0)  # once per block, not per leaf
        chunk = sum(self._chunk_rows(j, largest) * self._sample.row_bytes(j)
                    for j in range(len(self._sample.specs)))
        needed = sum(v.nbytes for v in values) + 2 * chains * chunk
        _diskspace.check_room(self._filename, needed,
                              f"the file keeps the {sum(self._counts)} samples written before")
