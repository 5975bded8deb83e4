"""The HDF5 collector's datasets: created at the first block, grown as draws and chains come.

Layout ``"posterior"``: one ``(chain, draw, ...)`` dataset per leaf under
``posterior/`` or ``sample_stats/``, with ``chain``/``draw``/``<var>_dim_k``
dimension scales. Layout ``"chains"``: one ``(draw, ...)`` dataset per leaf and
chain under ``/chain~{id}/``. Datasets are chunked and resizable, sized as
:mod:`jaxsave._store.hdf5.sizing` says.
:class:`HDF5Datasets` does this for a collector, through the file it is given
(:class:`ChangingFile`), one subclass per layout (:class:`PosteriorDatasets`,
:class:`ChainDatasets`; :meth:`HDF5Datasets.for_layout` picks it); :class:`ChainRows`
holds the rows each chain has and expects. Rows go in through
:mod:`jaxsave._store.hdf5.chunks` (whole chunks straight to the file).
"""

from __future__ import annotations

import abc
import json
import math
from collections.abc import Callable
from typing import Protocol

import h5py
import numpy as np

from jaxsave._core import diskspace as _diskspace
from jaxsave._core import dtypes as _dtypes
from jaxsave._store import schema
from jaxsave._store.hdf5.chunks import Target, write_block, write_rows
from jaxsave._store.hdf5.sample_file import attach_scales, create_scales
from jaxsave._store.hdf5.sizing import chunk_rows, draw_extent
from jaxsave.collectors import SampleLayout
from jaxsave.errors import SaverStateError

__all__ = [
    "ChainDatasets",
    "ChainRows",
    "ChangingFile",
    "HDF5Datasets",
    "PosteriorDatasets",
    "Target",
    "write_block",
    "write_rows",
]


class ChangingFile(Protocol):
    """The file :class:`HDF5Datasets` writes (:class:`jaxsave._store.hdf5.held_file.HeldFile`).

    ``file`` is the open handle, a new one after each :meth:`change` that swapped
    the file; ``change`` runs a function that creates objects where SWMR allows it.
    """

    filename: str
    #: The HDF5 driver of :attr:`file` (``None`` if it was not open), read once per handle: ``File.driver``
    #: costs 10 us, and the free space is checked per block only for the ``sec2``/``stdio`` drivers.
    driver: str | None

    @property
    def file(self) -> h5py.File: ...

    def change(self, change: Callable[[], None], *, then_swmr: bool = False) -> None: ...


class ChainRows:
    """Per chain: the rows written (``counts``) and expected (``capacity``, ``None`` if unknown).

    A chain's id is its index. ``counts`` are raised as rows are written; the file's
    ``sample_counts`` record them once flushed.

    >>> rows = ChainRows()
    >>> rows.adopt([4])  # a file that holds one chain of 4 draws
    >>> rows.add(10), rows.counts, rows.capacity
    (1, [4, 0], [None, 10])
    """

    def __init__(self) -> None:
        self.counts: list[int] = []
        self.capacity: list[int | None] = []

    def adopt(self, counts: list[int]) -> None:
        """The chains a file holds already (their capacity unknown), before any chain is added."""
        self.counts, self.capacity = list(counts), [None] * len(counts)

    def add(self, capacity: int | None) -> int:
        """A new chain, with no rows yet; returns its id."""
        self.counts.append(0)
        self.capacity.append(capacity)
        return len(self.counts) - 1

    def restart(self, chain: int, count: int, capacity: int | None) -> None:
        """Chain ``chain`` continues after its first ``count`` rows (later ones are written over)."""
        self.counts[chain] = int(count)
        self.capacity[chain] = capacity

    def written(self) -> list[int]:
        """A copy of ``counts``."""
        return list(self.counts)

    def largest_capacity(self) -> int:
        """The largest known capacity of a chain (0 if none is known)."""
        return max((c for c in self.capacity if c), default=0)


class HDF5Datasets(abc.ABC):
    """The datasets of a collector's file: created once the loop is traced (:meth:`prepare`) or at
    the first block, grown, written, trimmed.

    Args:
      held: the file to write, and how to change it (:class:`ChangingFile`).
      compression: ``None``, ``"gzip"`` or ``"lzf"``.
      rows: the chains' counts and capacities; :meth:`append` and
        :meth:`append_block` raise the counts.

    What differs between the layouts is in the subclasses (:meth:`for_layout`). The
    sample's layout is set by :meth:`set_sample` (at the first chain) before rows are
    written. Handles are bound to :attr:`ChangingFile.file` and bound again (from
    their paths) whenever that is another handle.
    """

    def __init__(self, held: ChangingFile, compression: str | None, rows: ChainRows):
        self._held = held
        self.compression = compression
        self.rows = rows
        self._sample: SampleLayout | None = None
        self.entries: list[tuple[str, str]] = []  # (group, name) per leaf, layout "posterior"
        self._bound: h5py.File | None = None  # the handle the datasets belong to
        self._row_shapes: list[tuple[int, ...]] = []  # sample.storage_shape(j), for every block's check
        self._row_bytes: list[int] = []  # sample.row_bytes(j): a leaf's chunk looks at every leaf's
        self._sample_row_bytes = 0  # ... and at their sum
        self._chunk_bytes = 0  # bytes of one chunk of every leaf, of the datasets created (0: none yet)
        self._room: tuple[str, _diskspace.Room] | None = None  # the file's free-space check, made once

    @staticmethod
    def for_layout(layout: str, held: ChangingFile, compression: str | None, rows: ChainRows) -> HDF5Datasets:
        """The datasets of a file of ``layout`` (``"posterior"`` or ``"chains"``)."""
        kind = PosteriorDatasets if layout == schema.POSTERIOR else ChainDatasets
        return kind(held, compression, rows)

    # -- the sample -------------------------------------------------------------------------

    @property
    def has_sample(self) -> bool:
        """Whether :meth:`set_sample` was called (a chain was registered)."""
        return self._sample is not None

    @property
    def sample(self) -> SampleLayout:
        """The layout of one chain's sample; an error before :meth:`set_sample`."""
        if self._sample is None:
            raise SaverStateError("HDF5Collector: no chain was registered, so the sample's layout is unknown")
        return self._sample

    def set_sample(self, sample: SampleLayout, entries: list[tuple[str, str]]) -> None:
        """The sample's layout, and the ``(group, name)`` of each leaf (layout ``"posterior"``)."""
        self._sample, self.entries = sample, entries
        self._row_shapes = [sample.storage_shape(j) for j in range(len(sample.specs))]
        self._row_bytes = [sample.row_bytes(j) for j in range(len(sample.specs))]
        self._sample_row_bytes = sum(self._row_bytes)

    # -- handles ------------------------------------------------------------------------------

    def _current(self) -> h5py.File:
        """The file's current handle, the datasets' handles bound to it.

        Handles into a closed file are dead (h5py closes a file's objects with it), so
        every swap of the file must rebind; the paths come from the layout, not from
        the old handles (whose names are gone with their file).
        """
        file = self._held.file
        if file is not self._bound:
            self._bound = file
            self._bind(file)
        return file

    def forget(self) -> None:
        """Drop the handles (the file was closed): the next write binds what the file holds."""
        self._bound = None
        self._drop()

    @abc.abstractmethod
    def _bind(self, file: h5py.File) -> None:
        """Point the handles held at ``file``."""

    @abc.abstractmethod
    def _drop(self) -> None:
        """Hold no handles."""

    @abc.abstractmethod
    def names(self) -> list[str]:
        """The paths of every dataset written (to read them back after close)."""

    # -- creating -----------------------------------------------------------------------------

    def _create(
        self, group: h5py.Group, name: str, j: int, lead: tuple[int, ...], block: int
    ) -> h5py.Dataset:
        """Leaf ``j``'s dataset ``name`` in ``group``, of shape ``lead + row shape``; ``block``
        is the length of the first block (see :func:`~jaxsave._store.hdf5.sizing.chunk_rows`)."""
        sample = self.sample
        spec = sample.specs[j]
        shape = sample.storage_shape(j)
        dtype = _dtypes.storage_dtype(spec.dtype)
        rows = chunk_rows(self._row_bytes[j], self._sample_row_bytes, block, self.rows.largest_capacity())
        chunk_lead = (1,) * (len(lead) - 1) + (rows,)
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
        ds.attrs[schema.LEAF_KEY] = json.dumps(list(sample.keys[j]))
        return ds

    # -- counts -------------------------------------------------------------------------------

    def write_counts(self) -> None:
        """Record the counts in ``sample_counts`` (and each chain group's ``sample_count``)."""
        file = self._current()
        counts = np.asarray(self.rows.counts, dtype=np.int64)
        if file.attrs[schema.COUNTS].shape == counts.shape:
            file.attrs.modify(schema.COUNTS, counts)
        elif file.swmr_mode:  # a new attribute shape: not in SWMR mode (may swap the file)
            self._held.change(lambda: self._held.file.attrs.__setitem__(schema.COUNTS, counts))
            file = self._current()
        else:
            file.attrs[schema.COUNTS] = counts
        self._write_chain_counts(file)

    @abc.abstractmethod
    def _write_chain_counts(self, file: h5py.File) -> None:
        """Write the counts the layout keeps besides ``sample_counts``."""

    @abc.abstractmethod
    def finish_chain(self, chain: int) -> None:
        """The last rows of chain ``chain`` are written."""

    @abc.abstractmethod
    def trim(self) -> None:
        """Cut preallocated draws down to what was written (the caller then commits the counts)."""

    def prepare(self, block: int) -> None:
        """Create the datasets of every registered chain now, not at the first block, where every
        chain's capacity is known (else the first block's length sets the chunks: a short run of
        unknown length keeps a small file); chunked for blocks of ``block`` draws at most."""
        capacity = self.rows.capacity
        if capacity and None not in capacity:
            self._create_every(min(block, self.rows.largest_capacity()))

    @abc.abstractmethod
    def _create_every(self, block: int) -> None:
        """Create the datasets of every registered chain not created yet (for blocks of ``block``)."""

    # -- writing rows (writer thread) -------------------------------------------------------

    def check_rows(self, values: list[np.ndarray], lead: int, chains: int | None = None) -> None:
        """Refuse rows unlike the registered sample: the low-level writes would take them."""
        shapes = self._row_shapes
        if len(values) != len(shapes):
            raise TypeError(f"HDF5Collector: got rows of {len(values)} leaves, the sample has {len(shapes)}")
        leads = {np.shape(v)[:lead] for v in values}
        if len(leads) > 1 or (chains is not None and leads and next(iter(leads))[0] != chains):
            raise TypeError(
                f"HDF5Collector: the leaves' rows disagree on their leading (chain, draw) axes: "
                f"{sorted(leads)}" + (f" for {chains} chains" if chains is not None else "")
            )
        for j, (v, shape) in enumerate(zip(values, shapes)):
            if np.shape(v)[lead:] != shape:
                raise TypeError(
                    f"HDF5Collector: rows of leaf {schema.leaf_path(self.sample.keys[j])} have "
                    f"shape {np.shape(v)[lead:]}, the sample's is {shape}"
                )

    def append_block(self, chain_ids: list[int], values: list[np.ndarray]) -> None:
        """Rows ``values[j][i]`` of chains ``chain_ids[i]``, after each chain's count."""
        for i, chain in enumerate(chain_ids):
            self.append(chain, [leaf[i] for leaf in values])

    def append(self, chain: int, values: list[np.ndarray]) -> None:
        """Rows ``values[j]`` of chain ``chain``, after its count."""
        start, n = self.rows.counts[chain], len(values[0]) if values else 0
        self._check_space(1, values, n)
        dsets, targets, lead = self._chain_rows(chain, start + n, n)
        for ds, target, rows in zip(dsets, targets, values):
            write_rows(ds, lead, start, _dtypes.to_storable(rows), target)
        self.rows.counts[chain] += n

    @abc.abstractmethod
    def _chain_rows(
        self, chain: int, needed: int, block: int
    ) -> tuple[list[h5py.Dataset], list[Target], tuple[int, ...]]:
        """The datasets of chain ``chain``, grown to ``needed`` draws (created for blocks of
        ``block`` draws), their targets and the chain's index in them."""

    def _targets(self, dsets: list[h5py.Dataset], axis: int) -> list[Target]:
        """The :class:`Target` of each of one chain's datasets (read from the file once), and the
        bytes of one chunk of every leaf recorded for :meth:`_check_space`."""
        targets = [Target.of(ds, axis) for ds in dsets]
        total = sum(t.rows * b for t, b in zip(targets, self._row_bytes))
        self._chunk_bytes = max(self._chunk_bytes, total)
        return targets

    def _check_space(self, chains: int, values: list[np.ndarray], block: int) -> None:
        """Refuse a block (of ``block`` draws) the disk may not have room for, before HDF5 sees
        it, datasets not even grown (see :mod:`jaxsave._core.diskspace`).

        Room is needed for the block, a chunk per dataset and chain it may newly
        allocate and one still in the chunk cache.
        """
        if self._held.driver not in ("sec2", "stdio"):
            return
        needed = sum(v.nbytes for v in values) + 2 * chains * self._bytes_per_chunk_row(block)
        name = self._held.filename
        if self._room is None or self._room[0] != name:
            self._room = (name, _diskspace.Room(name))
        self._room[1].check(needed, f"the file keeps the {sum(self.rows.counts)} samples written before")

    def _bytes_per_chunk_row(self, block: int) -> int:
        """Bytes of one chunk of every leaf (one chain): of the datasets created (recorded as
        their targets are read), else of those a first block of ``block`` draws would create."""
        if self._chunk_bytes:
            return self._chunk_bytes
        largest = self.rows.largest_capacity()
        total = self._sample_row_bytes
        return sum(chunk_rows(b, total, block, largest) * b for b in self._row_bytes)


class PosteriorDatasets(HDF5Datasets):
    """Layout ``"posterior"``: one ``(chain, draw, ...)`` dataset per leaf, with dimension scales."""

    def __init__(self, held: ChangingFile, compression: str | None, rows: ChainRows):
        super().__init__(held, compression, rows)
        self._datasets: list[h5py.Dataset] = []  # one per leaf, once created
        self._dataset_targets: list[Target] = []  # theirs, read once they exist
        self._scales: list[tuple[h5py.Dataset, int]] = []  # each group's chain and draw scales, their axis

    def _bind(self, file: h5py.File) -> None:
        self._dataset_targets = []
        if self._datasets:
            self._bind_existing(file)

    def _bind_existing(self, file: h5py.File) -> None:
        """Handles to the datasets and dimension scales the file holds."""
        groups = dict.fromkeys(g for g, _ in self.entries)
        scales = {g: {name: file[g][name] for name in (schema.CHAIN_DIM, schema.DRAW_DIM)} for g in groups}
        self._hold([file[schema.posterior_dataset(g, v)] for g, v in self.entries], scales)

    def _hold(self, datasets: list[h5py.Dataset], scales: dict[str, dict[str, h5py.Dataset]]) -> None:
        """Keep these handles: the leaves' datasets, and each group's scales by name."""
        self._datasets = datasets
        self._scales = [
            (by_name[name], axis)
            for by_name in scales.values()
            for axis, name in enumerate((schema.CHAIN_DIM, schema.DRAW_DIM))
        ]

    def _drop(self) -> None:
        self._datasets, self._dataset_targets, self._scales = [], [], []

    def names(self) -> list[str]:
        return [ds.name for ds in self._handles()]

    def _handles(self) -> list[h5py.Dataset]:
        """The datasets, bound to the current handle."""
        self._current()
        return self._datasets

    def _chain_rows(
        self, chain: int, needed: int, block: int
    ) -> tuple[list[h5py.Dataset], list[Target], tuple[int, ...]]:
        dsets = self._grown(needed, block)
        return dsets, self._current_targets(), (chain,)

    def _current_targets(self) -> list[Target]:
        """The datasets' targets (after :meth:`_grown`), read at the first write to each handle."""
        if len(self._dataset_targets) != len(self._datasets):
            self._dataset_targets = self._targets(self._datasets, 1)
        return self._dataset_targets

    def _write_chain_counts(self, file: h5py.File) -> None:
        return None  # sample_counts only

    def finish_chain(self, chain: int) -> None:
        return None  # its rows are in the datasets of every chain

    def append_block(self, chain_ids: list[int], values: list[np.ndarray]) -> None:
        """One write per leaf where the chains are consecutive and level, else chain by chain."""
        counts = self.rows.counts
        first, starts = chain_ids[0], {counts[c] for c in chain_ids}
        if chain_ids != list(range(first, first + len(chain_ids))) or len(starts) != 1:
            super().append_block(chain_ids, values)
            return
        start, n = starts.pop(), values[0].shape[1] if values else 0
        self._check_space(len(chain_ids), values, n)
        dsets = self._grown(start + n, n)
        for ds, target, rows in zip(dsets, self._current_targets(), values):
            write_block(ds, first, start, _dtypes.to_storable(rows), target)
        for chain in chain_ids:
            counts[chain] += n

    def _grown(self, needed_draws: int, block: int = 0) -> list[h5py.Dataset]:
        """The datasets, created (for blocks of ``block`` draws) or grown to every registered
        chain and ``needed_draws`` draws."""
        n_chains = len(self.rows.counts)
        file = self._current()
        if not self._datasets:
            first_group, first_var = self.entries[0]
            if schema.posterior_dataset(first_group, first_var) in file:  # reopened after close
                self._bind_existing(file)
            else:
                self._held.change(lambda: self._create_all(n_chains, needed_draws, block), then_swmr=True)
        if self._handles()[0].shape[0] < n_chains:  # chains registered after the first block

            def grow() -> None:  # on the file `change` hands over (a copy): its handles, not ours
                self._resize(n_chains, max(self._handles()[0].shape[1], needed_draws))
                self.write_counts()

            self._held.change(grow, then_swmr=True)
        ds0 = self._handles()[0]
        if ds0.shape[1] < needed_draws:  # grow by a quarter at least: O(log n) resizes
            self._resize(n_chains, max(needed_draws, ds0.shape[1] + ds0.shape[1] // 4))
        return self._datasets

    def _create_all(self, n_chains: int, needed_draws: int, block: int) -> None:
        file = self._current()
        draws = draw_extent(self.rows.capacity[:n_chains], needed_draws)
        groups = {name: file.require_group(name) for name in dict.fromkeys(g for g, _ in self.entries)}
        scales = {
            name: create_scales(group, n_chains, draws, resizable=True) for name, group in groups.items()
        }
        datasets = []
        for j, (group_name, var) in enumerate(self.entries):
            ds = self._create(groups[group_name], var, j, (n_chains, draws), block)
            attach_scales(groups[group_name], ds, var, scales[group_name])
            datasets.append(ds)
        self._hold(datasets, scales)
        self.write_counts()

    def _resize(self, chains: int, draws: int) -> None:
        self._current()
        for ds in self._datasets:
            ds.resize((chains, draws) + ds.shape[2:])
        for scale, axis in self._scales:
            old, size = scale.shape[0], (chains, draws)[axis]
            if old != size:
                scale.resize((size,))
                if size > old:
                    scale[old:] = np.arange(old, size)

    def trim(self) -> None:
        self._grown(0)
        self._resize(len(self.rows.counts), max(self.rows.counts))

    def _create_every(self, block: int) -> None:
        self._grown(0, block)


class ChainDatasets(HDF5Datasets):
    """Layout ``"chains"``: one ``(draw, ...)`` dataset per leaf and chain under ``/chain~{id}/``."""

    def __init__(self, held: ChangingFile, compression: str | None, rows: ChainRows):
        super().__init__(held, compression, rows)
        self._chains: dict[int, list[h5py.Dataset]] = {}  # the datasets of each chain created
        self._chain_targets: dict[int, list[Target]] = {}  # theirs, read at their first write

    def _bind(self, file: h5py.File) -> None:
        self._chains = {c: [file[n] for n in self._names(c)] for c in self._chains}
        self._chain_targets = {}

    def _drop(self) -> None:
        self._chains, self._chain_targets = {}, {}

    def names(self) -> list[str]:
        self._current()
        return [ds.name for dsets in self._chains.values() for ds in dsets]

    def _names(self, chain: int) -> list[str]:
        """The paths of chain ``chain``'s datasets."""
        return [schema.chain_dataset(chain, key) for key in self.sample.keys]

    def _chain_rows(
        self, chain: int, needed: int, block: int
    ) -> tuple[list[h5py.Dataset], list[Target], tuple[int, ...]]:
        dsets = self._grown(chain, needed, block)
        targets = self._chain_targets.get(chain)
        if targets is None or len(targets) != len(dsets):
            targets = self._chain_targets[chain] = self._targets(dsets, 0)
        return dsets, targets, ()

    def _grown(self, chain: int, needed: int, block: int = 0) -> list[h5py.Dataset]:
        """Chain ``chain``'s datasets, created (with every registered chain's) or grown to ``needed``."""
        self._current()
        if chain not in self._chains:
            self._held.change(lambda: self._create_all(chain, needed, block), then_swmr=True)
            self._current()
        dsets = self._chains[chain]
        if dsets and dsets[0].shape[0] < needed:
            for ds in dsets:
                ds.resize((needed,) + ds.shape[1:])
        return dsets

    def _create_all(self, chain: int, needed: int, block: int) -> None:
        """Datasets of every registered chain at once (a SWMR file cannot get objects later),
        chunked for blocks of ``block`` draws."""
        file = self._current()
        for c in range(len(self.rows.counts)):
            if c in self._chains:
                continue
            names = self._names(c)
            if names and names[0] in file:  # reopened after close: bind what exists
                self._chains[c] = [file[n] for n in names]
                continue
            group = file.require_group(schema.chain_group(c))
            draws = draw_extent([self.rows.capacity[c]], needed if c == chain else 0)
            dsets = []
            for j, key in enumerate(self.sample.keys):
                parent = group
                for part in key[:-1]:
                    parent = parent.require_group(part)
                name = key[-1] if key else schema.BARE_LEAF
                dsets.append(self._create(parent, name, j, (draws,), block))
            group.attrs[schema.CHAIN_COUNT] = 0
            self._chains[c] = dsets
        self.write_counts()

    def _write_chain_counts(self, file: h5py.File) -> None:
        for chain in self._chains:
            file[schema.chain_group(chain)].attrs.modify(schema.CHAIN_COUNT, self.rows.counts[chain])

    def finish_chain(self, chain: int) -> None:
        """The chain's group exists (created now if it got no rows)."""
        if self.has_sample:
            self._grown(chain, self.rows.counts[chain])

    def _create_every(self, block: int) -> None:
        for c in range(len(self.rows.counts)):
            self._grown(c, 0, block)  # the first missing one creates them all

    def trim(self) -> None:
        counts = self.rows.counts
        for c in range(len(counts)):
            self._grown(c, 0)
        for chain, dsets in self._chains.items():
            for ds in dsets:
                ds.resize((counts[chain],) + ds.shape[1:])
