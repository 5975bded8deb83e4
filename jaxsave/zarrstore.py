"""The Zarr collector: samples stream into a Zarr v3 store that ArviZ and xarray open directly.

The store is a local directory, a URL zarr understands (``memory://``, ``s3://...``,
``gs://...`` through fsspec) or any zarr store object. Its layout is the HDF5
collector's ``"posterior"`` layout (:mod:`jaxsave._store.schema`): groups ``posterior/``
and ``sample_stats/``, one ``(chain, draw, ...)`` array per leaf with the
``dimension_names`` ``chain``, ``draw`` and ``<var>_dim_k``, the root attributes
``jaxsave_format``, ``jaxsave_version``, ``jaxsave_layout``, ``created`` and
``jaxsave_structure``, and ``sample_counts`` as an int64 array with one chunk per
chain, written after the draws it counts. See ``docs/zarr.md``.

``zarr`` (``pip install 'jaxsave[zarr]'``) is imported when a collector is made.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from jaxsave._core import filelock as _filelock
from jaxsave._core import paths as _paths
from jaxsave._serialize.treespec import encode_structure
from jaxsave._store import schema
from jaxsave._store.location import describe
from jaxsave._store.names import StatsSpec, check_zarr_names, leaf_entries
from jaxsave._store.zarr import store as _store
from jaxsave._store.zarr.arrays import CHECKPOINT_PREFIX, StoreArrays, chunk_shape
from jaxsave._store.zarr.held_rows import HeldRows
from jaxsave._store.zarr.held_store import (
    StoreWriter,
    check_arguments,
    run_token,
    stored_count,
    this_first_chain,
)
from jaxsave._stream import resume as _resume
from jaxsave.collectors import (
    DataCollector,
    SampleLayout,
    check_continuable,
    check_rows,
    nonempty_sample_layout,
    samples_collected,
)
from jaxsave.errors import (
    CapacityError,
    JaxsaveError,
    SaverStateError,
    StructureMismatchError,
)

logger = logging.getLogger("jaxsave")

__all__ = ["ZarrCollector"]

#: How long a writer that does not create the store waits for the one that does.
CREATE_TIMEOUT_S = 120.0
#: The draw axis grows by at least this factor when a chain outgrows it.
GROWTH = 1.5
#: Rows kept for the next commit beyond this many bytes are written at once.
BUFFER_BYTES = 64 * 2**20
#: The errnos of a full disk (or quota, or file-size limit).
_FULL_DISK = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


class ZarrCollector(DataCollector):
    """Write samples to a Zarr v3 store, in blocks, from a writer thread.

    Args:
      store: a directory path, a URL zarr understands (``"memory://run"``,
        ``"s3://bucket/run.zarr"``), or a zarr store or group object.
      mode: ``"w"`` (create, or replace a jaxsave store; default), ``"x"`` (fail if
        the store exists) or ``"a"`` (continue an existing store, e.g. to resume its
        chains from a checkpoint; created if missing). ``"w"`` refuses to delete
        anything that is not a jaxsave store (a non-empty directory, another
        program's Zarr store). A store takes one writer at a time (a local directory: the
        lock ``<dir>.lock``, as for HDF5; other stores: within this process): a second
        raises :class:`jaxsave.FileInUseError`.
      sample_stats: leaves to store in ``sample_stats/`` instead of ``posterior/``
        (top-level names, or a predicate on a leaf's key path), as for HDF5.
      compression: ``None`` (default: raw chunks, fastest), ``"zstd"``, ``"gzip"``,
        ``"blosc"`` or a zarr codec object.
      flush_interval: write the draws and then their counts at most once per this
        many seconds (default 0.2; always at the end of a chain and before a
        checkpoint; at once beyond 64 MiB of draws): a partly filled chunk is
        written once per interval, not once per block. A crash loses at most
        the draws of the last interval.
      checkpoint_interval: write the checkpoint at most once per this many seconds
        (default 1); the newest is always written at the end.
      draws: the draw axis' length when the chains' ``samples_collected`` is unknown;
        needed when several processes write one store (nobody may grow it then).
      shared: whether several processes write this store at once (default: when
        ``jax.process_count() > 1``). Then the chain axis is fixed (``chains=``), each
        process writes only its own chains (ids from ``first_chain``), the writer
        of chain 0 creates the store and every other one waits for it (up to
        ``create_timeout`` seconds), and nobody resizes an array.
      chains: the store's number of chains, all processes together (shared stores).
      first_chain: the global id of this collector's first chain (shared stores;
        default ``jax.process_index() * chains // jax.process_count()``).
      run_id: with ``shared`` and ``mode="w"``, the id that tells the processes'
        collectors of one run apart from an older store at the same place (default:
        process 0's random id, broadcast to all with ``jax.experimental.multihost_utils``,
        which every process must then reach at the same point).
      storage_options: fsspec options for a URL (credentials, ``endpoint_url``...).

    >>> import tempfile, os, jax, jax.numpy as jnp, jaxsave, zarr
    >>> path = os.path.join(tempfile.mkdtemp(), "chains.zarr")
    >>> init, save, postprocess = jaxsave.save(jaxsave.ZarrCollector(path, sample_stats=("lp",)))
    >>> state = init({"x": jnp.zeros((2, 3)), "lp": jnp.zeros(2)}, None, chains=2)
    >>> sample = lambda i: {"x": jnp.full(3, i, jnp.float32), "lp": -jnp.float32(i)}
    >>> step = lambda s, i: save(s, i % 2 == 0, sample(i))
    >>> state = jax.vmap(lambda s: jax.lax.scan(step, s, jnp.arange(10))[0])(state)
    >>> postprocess(state, None)["sample_count"].tolist()
    [5, 5]
    >>> group = zarr.open_group(path, mode="r")
    >>> group["posterior/x"].shape, group["sample_stats/lp"].metadata.dimension_names
    ((2, 5, 3), ('chain', 'draw'))
    """

    def __init__(
        self,
        store: Any,
        *,
        mode: str = "w",
        sample_stats: StatsSpec = None,
        compression: Any = None,
        flush_interval: float = 0.2,
        checkpoint_interval: float = 1.0,
        draws: int | None = None,
        shared: bool | None = None,
        chains: int | None = None,
        first_chain: int | None = None,
        run_id: str | None = None,
        create_timeout: float = CREATE_TIMEOUT_S,
        storage_options: dict | None = None,
    ):
        check_arguments(
            mode,
            compression,
            sample_stats,
            seconds={
                "flush_interval": flush_interval,
                "checkpoint_interval": checkpoint_interval,
                "create_timeout": create_timeout,
            },
            counts={"draws": draws, "chains": chains, "first_chain": first_chain},
        )
        _store.require_zarr()
        import jax

        self.shared = jax.process_count() > 1 if shared is None else bool(shared)
        first_chain = this_first_chain(self.shared, chains, first_chain)
        self.mode = mode
        self.compression = compression
        self.flush_interval = float(flush_interval)
        self.checkpoint_interval = float(checkpoint_interval)
        self.create_timeout = float(create_timeout)
        self.draws = None if draws is None else int(draws)
        self.chains = None if chains is None else int(chains)
        self.first_chain = int(first_chain or 0)
        self.owner = self.first_chain == 0
        self._stats = sample_stats
        self._name = describe(store)
        self._lock = threading.RLock()
        self._sample: SampleLayout | None = None
        self._treespec: dict | None = None
        self._entries: list[tuple[str, str]] = []
        self._arrays: StoreArrays | None = None
        self._counts: dict[int, int] = {}  # this collector's chains: kept draws
        self._committed_counts: dict[int, int] = {}
        self._capacity: dict[int, int | None] = {}
        self._finalized: set[int] = set()
        self._committed = -float("inf")
        self._held = HeldRows()  # rows not written yet
        self._closed = False
        self._trimmed = False  # trimmed (and consolidated) since the last draw, chain or reopen
        token = run_token(run_id) if self.shared and mode == "w" else None  # every process, at once
        self._file_lock: _filelock.FileLock | None = None
        self.local = _store.local_directory(store)
        if self.local is not None:
            _paths.check_directory(self.local, self._name)
        self._writer = writer = StoreWriter(
            store,
            storage_options,
            self._name,
            self.local,
            mode,
            shared=self.shared,
            owner=self.owner,
            first_chain=self.first_chain,
            chains=self.chains,
            token=token,
            create_timeout=self.create_timeout,
        )
        self._file_lock = writer.lock()
        try:
            self._group, self._location, stored = writer.open()
        except BaseException:
            self._release_lock()
            raise
        self._newest = _resume.NewestCheckpoints(
            self.checkpoint_interval,
            lambda: _resume.read_store_key(self._location, self.checkpoint_key),
            lambda records, spec: _resume.write_store_key(self._location, self.checkpoint_key, records, spec),
            commit=self._commit,
        )
        if stored is not None and not self.shared:  # mode "a": which chains are a shared store's
            for chain, count in enumerate(stored.tolist()):  # process's is known when it reopens them
                self._adopt(chain, count)

    # -- the store ----------------------------------------------------------------------

    @property
    def group(self) -> Any:
        """The open root ``zarr.Group``."""
        return self._group

    @property
    def store(self) -> Any:
        """The zarr store object."""
        return self._location.store

    # -- registration --------------------------------------------------------------------

    def register_chain(
        self, init_sample=None, init_checkpoint=None, static_information=None, **unused
    ) -> int:
        with self._lock:
            self._require_open()
            capacity = samples_collected(static_information)
            if self._set_layout(init_sample) and self.owner:
                self._group.attrs[schema.STRUCTURE] = self._structure_json()
            if self.shared:
                chain = self.first_chain + sum(1 for c in self._counts if c >= self.first_chain)
                if chain >= self.chains:  # type: ignore[operator]
                    raise SaverStateError(
                        f"ZarrCollector: chain {chain} is beyond the store's {self.chains} chains "
                        f"(chains=); this process's chains start at {self.first_chain}"
                    )
                if (self.draws if self.draws is not None else capacity) is None:
                    raise SaverStateError(
                        "ZarrCollector: several processes write this store, so nobody may grow its draw "
                        "axis, and its length is unknown: pass static_information(samples_collected=n) "
                        "to init, or ZarrCollector(..., draws=n)"
                    )
            else:
                chain = max(self._counts, default=-1) + 1
            self._counts[chain] = self._committed_counts[chain] = 0
            self._capacity[chain] = capacity
            self._trimmed = False
            return chain

    def _set_layout(self, init_sample: Any) -> bool:
        """Record the samples' layout (first chain: returns True) or check that it matches."""
        layout = nonempty_sample_layout(init_sample, "ZarrCollector")
        if self._sample is None:
            entries = leaf_entries(layout.keys, self._stats, schema.POSTERIOR)
            check_zarr_names(layout.keys, entries)
            try:
                treespec = encode_structure(init_sample)[0]
            except (JaxsaveError, TypeError, ValueError) as error:
                logger.warning(
                    "jaxsave: the sample's tree structure is not stored (%s); load it with like=", error
                )
                treespec = None
            self._sample, self._treespec, self._entries = layout, treespec, entries
            self._check_stored_structure()
            return True
        if layout.keys != self._sample.keys or layout.specs != self._sample.specs:
            raise StructureMismatchError(
                "all chains in one ZarrCollector must have samples of the same structure"
            )
        return False

    def _check_stored_structure(self) -> None:
        """A store that already describes its leaves (mode "a", a shared store) must describe ours."""
        if self._sample is not None:
            self._writer.check_structure(self._structure_json)

    def _structure_json(self) -> str:
        assert self._sample is not None
        s = self._sample
        return schema.structure_json(s.keys, self._entries, s.specs, s.treedef, self._treespec)

    # -- the arrays ---------------------------------------------------------------------

    def _n_chains(self) -> int:
        return self.chains if self.shared else max(self._counts, default=-1) + 1  # type: ignore[return-value]

    def _extent(self, needed: int) -> int:
        """The draw axis a new store gets: the longest known count, or ``draws=``, or ``needed``."""
        caps = [c for c in self._capacity.values() if c is not None]
        if self.draws is not None:
            return max(needed, self.draws)
        if caps and len(caps) == len(self._capacity):
            return max(needed, *caps)
        return needed

    def _bound(self, needed: int) -> StoreArrays:
        """The arrays, created or bound, holding all chains and at least ``needed`` draws."""
        assert self._sample is not None
        if self._arrays is None:
            self._arrays = StoreArrays(self._group, self._entries, self._sample)
        arrays = self._arrays
        if not arrays.bound and not arrays.bind():
            if self.owner:
                self._check_stored_structure()
                known = [c for c in self._capacity.values() if c is not None]
                largest = self.draws or max(known, default=0) or None
                chunk = chunk_shape(self._sample, largest, self._n_chains(), one_writer=not self.shared)
                arrays.create(self._n_chains(), self._extent(needed), chunk, self.compression)
                if self.shared:  # shapes that never change: xarray may read them from the root
                    _store.consolidate(self._location)
            else:
                self._writer.wait_for_arrays(arrays, self._structure_json)
        chains, draws = arrays.shape
        if chains < self._n_chains() or draws < needed or (not arrays.aligned and not self.shared):
            if self.shared:
                raise CapacityError(
                    f"ZarrCollector: a chain needs {needed} draws but the shared store {self._name} holds "
                    f"{draws}; several processes write it, so nobody grows it: pass draws= (or "
                    "samples_collected) large enough"
                )
            grown = draws if draws >= needed else max(needed, math.ceil(draws * GROWTH))
            arrays.resize(max(chains, self._n_chains()), grown)
        return arrays

    # -- writing (writer thread) ---------------------------------------------------------

    def _require_open(self) -> None:
        if self._closed:
            raise SaverStateError(f"this ZarrCollector of {self._name} is closed")

    def _check_chains(self, chain_ids: list[int]) -> None:
        unknown = [c for c in chain_ids if c not in self._counts]
        if unknown:
            raise SaverStateError(f"ZarrCollector: chains {unknown} were not registered with this collector")

    def save(self, chain_id: int, values: list[np.ndarray]) -> None:
        self.save_block([chain_id], [np.asarray(v)[None] for v in values])

    def save_block(self, chain_ids: list[int], values: list[np.ndarray]) -> None:
        with self._lock:
            self._require_open()
            self._check_chains(chain_ids)
            assert self._sample is not None  # a registered chain
            check_rows(self._sample, values, 2, chains=len(chain_ids), who="ZarrCollector")
            n = values[0].shape[1]
            if n == 0:
                return
            self._trimmed = False
            first = chain_ids[0]
            starts = {self._counts[c] for c in chain_ids}
            if chain_ids == list(range(first, first + len(chain_ids))) and len(starts) == 1:
                start = starts.pop()
                arrays = self._bound(start + n)
                whole_chains = arrays.whole_chains(first, len(chain_ids))
                if whole_chains and arrays.raw:
                    # Uncompressed: the chunks these rows complete are written now, whole; the rows
                    # of a chunk not yet full are kept (from its first draw) and written at the
                    # commit, whole again. No chunk is read; the counts follow at the commit.
                    with self._disk_errors():
                        arrays.partial.add(first, start, values, self._stored_rows)
                elif whole_chains and start % arrays.chunk_draws == 0 and n % arrays.chunk_draws == 0:
                    # Whole chunks: no chunk is read and rewritten, so no reason to keep (and copy)
                    # the rows until the commit; the counts still follow at the commit.
                    with self._disk_errors():
                        arrays.write(first, start, values)
                else:
                    self._buffer_rows(first, start, values)
            else:
                for i, chain in enumerate(chain_ids):
                    self._buffer_rows(chain, self._counts[chain], [leaf[i : i + 1] for leaf in values])
            for chain in chain_ids:
                self._counts[chain] += n
            if time.monotonic() - self._committed >= self.flush_interval or self._held.nbytes >= BUFFER_BYTES:
                self._commit()

    def _buffer_rows(self, first: int, start: int, values: list[np.ndarray]) -> None:
        """Keep rows of chains ``first...`` at draws ``start...`` until the next commit (one write
        a commit, not a block: a partly filled chunk is read and rewritten once per interval)."""
        if self._arrays is not None:  # kept whole chunks of these chains go first (this is read-modify-write)
            partial = self._arrays.partial
            partial.write(partial.covers(first, len(values[0])), drop=True)
        self._held.add(first, start, values)

    def _stored_rows(self, first: int, chains: int, start: int, stop: int) -> list[np.ndarray]:
        """The stored rows of a chunk this writer continues but did not keep (resume, mode "a")."""
        self._held.write(self._bound)
        return self._bound(stop).read(first, chains, start, stop)

    def _commit(self) -> None:
        """Write the buffered draws, then the counts that changed (each chain its own key)."""
        with self._disk_errors():
            self._held.write(self._bound)
            if self._arrays is not None:
                self._arrays.partial.write()  # the chunks not yet full, whole (the fill past the counts)
            changed = {c: n for c, n in self._counts.items() if self._committed_counts.get(c) != n}
            if changed and self._sample is not None:
                self._bound(0).write_counts(changed, self._counts)
                self._committed_counts.update(changed)
        self._committed = time.monotonic()

    @contextlib.contextmanager
    def _disk_errors(self) -> Iterator[None]:
        """A full disk (``ENOSPC``, ``EFBIG``, ``EDQUOT``) while writing: an ``OSError`` of the
        same errno that names the store and what it still holds."""
        try:
            yield
        except OSError as error:
            if error.errno not in _FULL_DISK:
                raise
            stored = {c: self._committed_counts.get(c, 0) for c in sorted(self._counts)}
            raise OSError(
                error.errno,
                f"{self._name}: the disk is full ({error}) while writing draws; the store keeps "
                f"the draws it counts, {stored} (readable as they are): make room, then continue "
                "from the run's last checkpoint (jaxsave.resume) if it writes them",
            ) from error

    def finalize(self, chain_id: int) -> None:
        with self._lock:
            self._require_open()
            self._finalized.add(chain_id)
            self._commit()
            if self._finalized >= set(self._counts):
                self._trim()
                self._newest.write()

    def _trim(self) -> None:
        """The only writer: cut the draw axis to the longest chain (and create empty arrays)."""
        if self._sample is None or not self._counts:
            return
        longest = max(self._counts.values())
        arrays = self._bound(longest)
        if not self.shared and (arrays.shape[1] != longest or not arrays.aligned):
            arrays.resize(arrays.shape[0], longest)
        self._commit()
        if not self.shared:  # until a reopen (mode "a") drops it again
            _store.consolidate(self._location)
        self._trimmed = True

    # -- checkpoints and resume ----------------------------------------------------------

    @property
    def checkpoint_key(self) -> str:
        """This collector's checkpoint key, below the store's root."""
        return f"{CHECKPOINT_PREFIX}{self.first_chain}"

    def checkpoint(self, records: dict, spec: Any) -> None:
        """Keep the newest checkpoints; write them if ``checkpoint_interval`` has passed."""
        with self._lock:
            self._require_open()
            if self._newest.keep(records, spec):
                self._newest.write()

    def resume(self) -> tuple[dict, Any]:
        """This collector's chains' newest checkpoints (those it wrote, or found in the store)."""
        with self._lock:
            if self._newest.pending and not self._closed:
                self._newest.write()
            return self._newest.load()

    def reopen_chain(
        self,
        chain_id: int,
        sample_count: int,
        init_sample: Any = None,
        init_checkpoint: Any = None,
        static_information: Any = None,
    ) -> None:
        """Continue chain ``chain_id`` of this store after its first ``sample_count`` samples."""
        with self._lock:
            self._require_open()
            if chain_id not in self._counts and self.shared and self.mode == "a":
                self._adopt_shared_chain(chain_id)
            count = self._counts.get(chain_id)
            check_continuable(self._name, chain_id, count, sample_count, " (open it with mode='a')")
            self._set_layout(init_sample)
            self._commit()  # rows of the run before are in the store before they are written over
            if self._arrays is not None:  # kept rows past the new count are not ours to write again
                self._arrays.partial.forget([chain_id])
            self._counts[chain_id] = int(sample_count)  # later draws are written over ...
            self._commit()  # ... once the store no longer counts them
            self._capacity[chain_id] = samples_collected(static_information)
            self._finalized.discard(chain_id)
            self._trimmed = False

    def _adopt_shared_chain(self, chain_id: int) -> None:
        """A shared store in mode "a": take over chain ``chain_id`` (one of this process's, from
        ``first_chain`` on) with its stored count; the other processes' chains stay theirs."""
        if self.first_chain <= chain_id < (self.chains or 0):
            count = stored_count(self._group, chain_id)
            if count is not None:
                self._adopt(chain_id, count)

    def _adopt(self, chain_id: int, count: int) -> None:
        """A stored chain keeps its id and count (finalized until reopened)."""
        self._counts[chain_id] = self._committed_counts[chain_id] = count
        self._capacity[chain_id] = None
        self._finalized.add(chain_id)

    def exit_note(self) -> str:
        return f"are written to the Zarr store {self._name} and it is closed"

    def close(self) -> None:
        """Write the counts, trim the draw axis (the only writer), write the checkpoint, unlock."""
        with self._lock:
            if self._closed:
                return
            try:
                if (
                    self._sample is not None
                    and not self._trimmed  # the last finalize did, and nothing changed since
                    and (self.owner or any(self._counts.values()))
                ):
                    self._trim()
                self._newest.write()
            finally:
                self._closed = True
                self._release_lock()

    def _release_lock(self) -> None:
        if self._file_lock is not None:
            self._file_lock.release()
            self._file_lock = None
