"""The HDF5 collector: samples stream into a file that ArviZ and xarray open directly.

Layout ``"posterior"`` (the default): one dataset per sample leaf in the group
``posterior/`` (or ``sample_stats/`` for the leaves chosen with ``sample_stats=``),
shaped ``(chain, draw, ...)``, with HDF5 dimension scales named ``chain``,
``draw`` and ``<var>_dim_k``. Layout ``"chains"``: the older ``io`` module's
``/chain~{id}/<key>/<subkey>``, one ``(draw, ...)`` dataset per chain.

Root attributes: ``jaxsave_version``, ``jaxsave_format``, ``jaxsave_layout``,
``created``, ``jaxsave_structure`` (JSON: key path, group, name, dtype and shape
of every leaf, in ``jax.tree.leaves`` order, and the tree's pickle-free ``treespec``)
and ``sample_counts`` (kept samples
per chain). Counts are only ever raised after the rows they count have been
flushed, so a reader never trusts draws that were not completely written.
See ``docs/hdf5.md`` for the full layout and the crash-safety guarantees.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

import h5py
import numpy as np

from jaxsave._core import atomic as _atomic
from jaxsave._core import filelock as _filelock
from jaxsave._serialize.treespec import encode_structure
from jaxsave._store import schema
from jaxsave._store.hdf5 import sample_file
from jaxsave._store.hdf5 import superblock as _superblock
from jaxsave._store.hdf5 import swmr_file as _swmr_file
from jaxsave._store.hdf5.datasets import HDF5Datasets
from jaxsave._store.hdf5.names import StatsSpec, leaf_entries
from jaxsave._store.hdf5.owner import OwnedFile
from jaxsave._stream import resume as _resume
from jaxsave.collectors import DataCollector, SampleLayout, sample_layout, samples_collected
from jaxsave.errors import FileFormatError, JaxsaveError, SaverStateError, StructureMismatchError

logger = logging.getLogger("jaxsave")

__all__ = ["HDF5Collector", "FORMAT_VERSION"]

#: Version of the file layout written by this module.
#: The sample-file format version (:data:`jaxsave._store.schema.SAMPLE_FILE_FORMAT`).
FORMAT_VERSION = schema.SAMPLE_FILE_FORMAT
_LAYOUTS = schema.LAYOUTS


def _encode_treespec(init_sample: Any) -> dict | None:
    """The pickle-free JSON description of the sample's tree (``None`` if it cannot be described)."""
    try:
        return encode_structure(init_sample)[0]
    except (JaxsaveError, TypeError, ValueError) as error:
        logger.warning("jaxsave: the sample's tree structure is not stored (%s); load it with like=", error)
        return None


class HDF5Collector(HDF5Datasets, OwnedFile, DataCollector):
    """Write samples to an HDF5 file, in blocks, from a writer thread.

    Args:
      file: a path, or an open, writable ``h5py.File`` (which you then close yourself).
      layout: ``"posterior"`` (ArviZ/xarray layout, default) or ``"chains"``
        (the older ``/chain~{id}/...`` layout).
      mode: how a path is opened: ``"w"`` (create or truncate, default), ``"x"``
        (fail if it exists) or ``"a"`` (continue an existing file, e.g. to resume
        its chains from a checkpoint). A path takes one writer at a time: the
        collector locks ``<file>.lock`` until it is closed, and a second one
        (in any process) raises :class:`jaxsave.FileInUseError`.
      compression: ``None`` (default), ``"gzip"`` or ``"lzf"``.
      flush_every: flush the file after every n-th written block (default 1);
        0 flushes only at the end.
      flush_interval: ... but at most once per this many seconds (default 0.2),
        so that tiny, fast blocks do not wait for the disk; a crash loses at
        most the draws of the last interval.
      sample_stats: leaves to store in ``sample_stats/`` instead of
        ``posterior/``: a sequence of top-level names (``("lp", "step_size")``)
        or a predicate on a leaf's key path (``lambda key: key[-1] == "lp"``).
      swmr: open a path with ``libver="latest"`` and switch to single-writer /
        multiple-reader mode once the datasets exist (default ``True`` for a
        path): readers (:func:`jaxsave.open_live`) can follow the run, and a
        killed process leaves a consistent file. ``False`` writes files that
        HDF5 1.8 reads, but a kill during a flush can corrupt them.
      fsync: also ``fsync`` the file after each flush (survives power loss of
        the flushed data, at a large cost in throughput).
      checkpoint_interval: write the checkpoint file (``<file>.ckpt``) at most
        once per this many seconds (default 1): a restart needs only the newest
        checkpoint, and a sampler that takes one every millisecond should not
        wait for the disk. The newest is always written at the end of the run.

    >>> import tempfile, os, jax, jax.numpy as jnp, jaxsave, h5py
    >>> path = os.path.join(tempfile.mkdtemp(), "chains.h5")
    >>> init, save, postprocess = jaxsave.save(jaxsave.HDF5Collector(path, sample_stats=("lp",)))
    >>> state = init({"x": jnp.zeros((2, 3)), "lp": jnp.zeros(2)}, None, chains=2)
    >>> sample = lambda i: {"x": jnp.full(3, i, jnp.float32), "lp": -jnp.float32(i)}
    >>> step = lambda s, i: save(s, i % 2 == 0, sample(i))
    >>> state = jax.vmap(lambda s: jax.lax.scan(step, s, jnp.arange(10))[0])(state)
    >>> postprocess(state, None)["sample_count"].tolist()
    [5, 5]
    >>> with h5py.File(path) as f:
    ...     f["posterior/x"].shape, f["sample_stats/lp"].shape
    ((2, 5, 3), (2, 5))
    """

    def __init__(
        self,
        file: str | os.PathLike | h5py.File,
        *,
        layout: str = "posterior",
        mode: str = "w",
        compression: str | None = None,
        flush_every: int = 1,
        flush_interval: float = 0.2,
        sample_stats: StatsSpec = None,
        swmr: bool | None = None,
        fsync: bool = False,
        checkpoint_interval: float = 1.0,
    ):
        if layout not in _LAYOUTS:
            raise ValueError(f"layout must be one of {_LAYOUTS}, got {layout!r}")
        if compression not in (None, "gzip", "lzf"):
            raise ValueError(f"compression must be None, 'gzip' or 'lzf', got {compression!r}")
        if mode not in ("w", "x", "a"):
            raise ValueError(f"mode must be 'w', 'x' or 'a', got {mode!r}")
        if sample_stats is not None and layout != schema.POSTERIOR:
            raise ValueError("sample_stats= needs layout='posterior'")
        if isinstance(sample_stats, str):
            raise TypeError("sample_stats must be a sequence of names or a predicate, not a string")
        if not isinstance(flush_every, int) or flush_every < 0:
            raise ValueError(f"flush_every must be an int >= 0, got {flush_every!r}")
        for name, value in (("flush_interval", flush_interval), ("checkpoint_interval", checkpoint_interval)):
            if not isinstance(value, (int, float)) or not value >= 0 or math.isinf(value):
                raise ValueError(f"{name} must be a finite number of seconds >= 0, got {value!r}")
        self.layout = layout
        self.compression = compression
        self.flush_every = int(flush_every)
        self.flush_interval = float(flush_interval)
        self._committed = -float("inf")
        self.fsync = bool(fsync)
        self._stats = sample_stats
        self._lock = threading.RLock()
        self._sample: SampleLayout | None = None  # type: ignore[assignment]
        self._treespec: dict | None = None
        self._entries: list[tuple[str, str]] = []  # (group, name) per leaf, posterior layout
        self._capacity: list[int | None] = []
        self._counts: list[int] = []
        self._finalized: set[int] = set()
        self._datasets: list[h5py.Dataset] = []  # posterior layout: one per leaf
        self._chain_datasets: dict[int, list[h5py.Dataset]] = {}  # chains layout
        self._blocks = 0
        self._warned_swmr_change = False
        self._file_lock: _filelock.FileLock | None = None
        self._on_disk: tuple[int, int, int, int] | None = None  # our file's (see OwnedFile)
        if isinstance(file, h5py.File):
            if not file.id.valid:
                raise ValueError("the h5py.File is closed")
            if file.mode != "r+":
                raise ValueError("the h5py.File must be open for writing")
            latest = file.libver[0] not in ("earliest", "v108")
            if swmr and not latest:
                raise ValueError("swmr=True needs an h5py.File opened with libver='latest'")
            self._file, self._owned, self._path = file, False, None
            self.swmr = latest if swmr is None else bool(swmr)
            self._write_root_attrs()
        else:
            self._path = os.fspath(file)
            self.swmr = True if swmr is None else bool(swmr)
            self._owned = True
            try:
                self._file = self._create_file(mode)
            except BaseException:
                self._release_lock()
                raise
        self._adopt_existing_chains()
        self._checkpoints: dict[int, _resume.ChainCheckpoint] = {}
        self._checkpoint_spec: Any = None
        self._checkpoint_pending = False
        self._checkpoint_written = -float("inf")
        self.checkpoint_interval = float(checkpoint_interval)
        self._filename = self._file.filename  # still known after close()

    # -- the file on disk: complete and closed, or open in SWMR mode ------------------------

    def _create_file(self, mode: str) -> h5py.File:
        """Open the path; a new file appears only complete (written aside, then renamed)."""
        directory = os.path.dirname(os.path.abspath(self._path))
        if not os.path.isdir(directory):
            raise FileNotFoundError(
                f"cannot create {self._path!r}: the directory {directory!r} does not exist")
        if os.path.isdir(self._path):
            raise IsADirectoryError(f"{self._path!r} is a directory; HDF5Collector needs a file path")
        self._file_lock = _filelock.acquire(self._path)  # one writer per path, until close()
        self._remove_stale_temporaries()
        exists = os.path.exists(self._path)
        if mode == "x" and exists:
            raise FileExistsError(f"{self._path!r} exists (mode='x')")
        if mode == "a" and exists:
            self._check_takeover()
            # A killed writer's mark and lagging end address: we take the file over.
            _superblock.clear_open_flags(self._path, eoa_margin=_superblock.EOA_MARGIN)
            self._file = _swmr_file.open_path(self._path, "r+", swmr=self.swmr)
            if not self.swmr:
                self._write_root_attrs()
                return self._file
            stale = self._root_attrs_stale()
            self._file.close()
            if stale:  # rewriting attributes needs a copy in SWMR files: only when they change
                self._change(self._write_root_attrs)
                return self._file
            return _swmr_file.reopen(self._path, swmr=True)
        with _swmr_file.replaced(self._path, copy=False, swmr=self.swmr) as self._file:
            self._write_root_attrs()
        return _swmr_file.reopen(self._path, swmr=self.swmr)

    def _check_takeover(self) -> None:
        """mode="a": the path must be a jaxsave sample file (not another program's HDF5 file)."""
        try:
            with h5py.File(self._path, "r", locking=False) as f:
                ours = "jaxsave_format" in f.attrs
        except OSError:
            return  # unreadable while marked open by a killed writer: clear_open_flags checks it is HDF5
        if not ours:
            raise FileFormatError(f"{self._path!r} is an HDF5 file not written by jaxsave; mode='a' "
                                  "only continues jaxsave sample files (use mode='w' to replace it)")

    def _remove_stale_temporaries(self) -> None:
        """Delete what writers killed while changing this file (or its checkpoint) left next to it."""
        directory, name = os.path.split(os.path.abspath(self._path))
        if os.path.isdir(directory):
            for target in (name, name + _resume.CHECKPOINT_SUFFIX):
                _atomic.remove_stale_temporaries(directory, target=target)

    def _change(self, change: Callable[[], None], *, then_swmr: bool = False) -> None:
        """Run ``change`` (which creates objects or attributes) where a SWMR file allows it.

        A path opened with ``swmr`` is changed on a copy that then replaces it, so
        the file on disk is always complete or in SWMR mode, whenever the process
        is killed. Other files are changed in place (and enter SWMR mode after, if
        ``then_swmr``: once the datasets exist).
        """
        if not (self._owned and self.swmr):
            if self._file.swmr_mode:  # a user's file: it cannot be swapped
                self._change_in_swmr_mode(change)
            else:
                change()
            if then_swmr:
                self._start_swmr()
            return
        if self._file is not None and self._file.id.valid:
            self._check_on_disk()  # never copy (and so adopt) what someone else put at the path
            self._file.flush()  # complete on disk even if a reader in this process keeps it open
            self._file.close()  # ... which kills every handle into it: rebound below
        with _swmr_file.replaced(self._path, copy=True, swmr=True) as self._file:
            self._rebind()  # `change` works on the copy, through the copy's handles
            change()
        self._file = _swmr_file.reopen(self._path, swmr=True)
        self._rebind()

    def _change_in_swmr_mode(self, change: Callable[[], None]) -> None:
        """Change a user-supplied file that is in SWMR mode already, in place.

        SWMR mode cannot be left, and the file cannot be replaced by a copy, so a
        chain added after the first block (the older library's ``strategy="map"``)
        gets its datasets and counts right there, in SWMR mode: HDF5 writes them, but
        neither SWMR readers nor a killed process are guaranteed a consistent file
        while it does (``register_chain`` warns).
        """
        try:
            change()
        except (RuntimeError, OSError, ValueError, KeyError) as error:
            raise SaverStateError(
                f"this HDF5 library cannot add a chain to the h5py.File {self._filename!r} in "
                f"SWMR mode ({error}); pass a path, open the file without libver='latest' (or "
                "pass swmr=False), or init every chain before running") from error

    def _start_swmr(self) -> None:
        if self.swmr and not self._file.swmr_mode:
            self._file.swmr_mode = True

    @property
    def file(self) -> h5py.File:
        """The open ``h5py.File``."""
        return self._file

    # -- registration ----------------------------------------------------------------

    def register_chain(self, init_sample=None, init_checkpoint=None, static_information=None,
                       **unused) -> int:
        with self._lock:
            if self._set_layout(init_sample):
                self._change(lambda: self._file.attrs.__setitem__(schema.STRUCTURE,
                                                                  self._structure_json()))
            if not self._file.id.valid:
                if not self._owned:
                    raise ValueError("the h5py.File given to HDF5Collector was closed")
                if self._file_lock is None:
                    self._file_lock = _filelock.acquire(self._path)
                self._file = _swmr_file.reopen(self._path, swmr=self.swmr)
                self._datasets, self._chain_datasets = [], {}
            if not self._owned and self._file.swmr_mode and not self._warned_swmr_change:
                self._warned_swmr_change = True
                warnings.warn(
                    f"jaxsave: chain {len(self._counts)} is added to the h5py.File "
                    f"{self._filename!r} after the first block, in SWMR mode: its datasets are "
                    "created in place, which SWMR readers and crash safety do not cover; pass a "
                    "path (changed on a copy) or init every chain before running to keep them",
                    RuntimeWarning, stacklevel=4)
            self._capacity.append(samples_collected(static_information))
            self._counts.append(0)
            return len(self._counts) - 1

    def _set_layout(self, init_sample: Any) -> bool:
        """Record the samples' layout (first chain: returns True) or check that it matches."""
        layout = sample_layout(init_sample)
        if not layout.specs:
            raise StructureMismatchError(
                "HDF5Collector: the sample has no array leaves (an empty pytree), so there is nothing to "
                "write; save at least one leaf, or use MemoryCollector")
        if self._sample is None:
            self._entries = leaf_entries(layout.keys, self._stats, self.layout)
            self._sample, self._treespec = layout, _encode_treespec(init_sample)
            return True
        if layout.keys != self._sample.keys or layout.specs != self._sample.specs:
            raise StructureMismatchError(
                "all chains in one HDF5Collector must have samples of the same structure")
        return False

    def _structure_json(self) -> str:
        leaves = []
        for j, key in enumerate(self._sample.keys):
            group, name = self._entries[j]
            spec = self._sample.specs[j]
            leaves.append({"key": list(key), "group": group, "name": name, "dtype": spec.dtype,
                           "shape": list(spec.shape)})
        return json.dumps({"leaves": leaves, "treedef": str(self._sample.treedef),
                           "treespec": self._treespec})

    def _root_attrs_stale(self) -> bool:
        return sample_file.root_attributes_stale(self._file.attrs, self.layout)

    def _write_root_attrs(self) -> None:
        sample_file.write_root_attributes(self._file.attrs, self.layout)

    # -- writing (writer thread) ---------------------------------------------------------

    def _require_open(self) -> None:
        """Refuse to write into a file that was closed under the collector (by the user)."""
        if not self._file.id.valid:
            raise SaverStateError(
                f"the h5py.File {self._filename!r} given to HDF5Collector was closed while the "
                "sampler was still saving to it; keep it open until postprocess has returned")
        self._check_size()

    def save(self, chain_id: int, values: list[np.ndarray]) -> None:
        with self._lock:
            self._require_open()
            self._check_rows(values, 1)
            self._write_rows(chain_id, values)
            self._after_block()

    def save_block(self, chain_ids: list[int], values: list[np.ndarray]) -> None:
        with self._lock:
            self._require_open()
            self._check_rows(values, 2, chains=len(chain_ids))
            self._write_block(chain_ids, values)
            self._after_block()

    def _after_block(self) -> None:
        self._blocks += 1
        if (self.flush_every and self._blocks % self.flush_every == 0
                and time.monotonic() - self._committed >= self.flush_interval):
            self._commit()

    def _write_counts(self) -> None:
        counts = np.asarray(self._counts, dtype=np.int64)
        if self._file.attrs["sample_counts"].shape == counts.shape:
            self._file.attrs.modify("sample_counts", counts)
        elif self._file.swmr_mode:  # a new attribute shape: not in SWMR mode (may swap the file)
            self._change(lambda: self._file.attrs.__setitem__("sample_counts", counts))
        else:
            self._file.attrs["sample_counts"] = counts
        for chain in self._chain_datasets:
            self._file[schema.chain_group(chain)].attrs.modify(schema.CHAIN_COUNT, self._counts[chain])

    def _commit(self) -> None:
        """Flush the rows, then raise the counts and flush again: counts never run ahead of data."""
        self._check_on_disk()
        self._file.flush()
        self._write_counts()
        self._file.flush()
        if self.fsync:
            os.fsync(self._file.id.get_vfd_handle())
        self._check_on_disk(baseline=True)
        self._committed = time.monotonic()

    def finalize(self, chain_id: int) -> None:
        with self._lock:
            self._require_open()
            self._finalized.add(chain_id)
            if self.layout == schema.CHAINS and self._sample is not None:
                self._chain_group(chain_id, self._counts[chain_id])
            if len(self._finalized) == len(self._counts):
                self._trim()
                self._write_checkpoints()

    def _trim(self) -> None:
        """Cut preallocated draws down to what was kept, and record the final counts."""
        if self._sample is None or not self._counts:
            return
        if self.layout == schema.POSTERIOR:
            self._posterior(0)
            self._resize(len(self._counts), max(self._counts))
        else:
            for c in range(len(self._counts)):
                self._chain_group(c, 0)
            for chain, dsets in self._chain_datasets.items():
                for ds in dsets:
                    ds.resize((self._counts[chain],) + ds.shape[1:])
        self._commit()

    # -- checkpoints and resume ------------------------------------------------------------

    def _adopt_existing_chains(self) -> None:
        """In a file that already holds chains (mode "a"), they keep their ids and counts."""
        counts = np.asarray(self._file.attrs.get("sample_counts", np.zeros(0)), dtype=np.int64).reshape(-1)
        self._counts = counts.tolist()
        self._capacity = [None] * len(self._counts)
        self._finalized = set(range(len(self._counts)))  # until a chain is reopened

    @property
    def checkpoint_path(self) -> str:
        """Where checkpoints go: next to the samples file, ``<file>.ckpt``."""
        return self._filename + _resume.CHECKPOINT_SUFFIX

    def checkpoint(self, records: dict, spec: Any) -> None:
        """Keep the newest checkpoints; write them if ``checkpoint_interval`` has passed since
        the last write."""
        with self._lock:
            self._require_open()
            if not self._checkpoints and os.path.exists(self.checkpoint_path):
                self._checkpoints = _resume.read_file(self.checkpoint_path)[0]
            self._checkpoints.update(records)
            self._checkpoint_spec, self._checkpoint_pending = spec, True
            if time.monotonic() - self._checkpoint_written >= self.checkpoint_interval:
                self._write_checkpoints()

    def _write_checkpoints(self) -> None:
        """Commit the samples, then atomically replace ``<file>.ckpt`` with every chain's newest
        checkpoint."""
        if not self._checkpoint_pending:
            return
        self._commit()  # a checkpoint never counts samples that are not on disk
        _resume.write_file(self.checkpoint_path, self._checkpoints, self._checkpoint_spec)
        self._checkpoint_pending = False
        self._checkpoint_written = time.monotonic()

    def resume(self) -> tuple[dict, Any]:
        with self._lock:
            if self._checkpoint_pending and self._file.id.valid:
                self._write_checkpoints()
        if os.path.exists(self.checkpoint_path):
            return _resume.read_file(self.checkpoint_path)
        return {}, None

    def reopen_chain(self, chain_id: int, sample_count: int, init_sample: Any = None,
                     init_checkpoint: Any = None, static_information: Any = None) -> None:
        """Continue chain ``chain_id`` of this file after its first ``sample_count`` samples."""
        with self._lock:
            if not 0 <= chain_id < len(self._counts):
                raise SaverStateError(
                    f"{self._file.filename} has no chain {chain_id} to continue (open it with mode='a')")
            if self._counts[chain_id] < sample_count:
                raise SaverStateError(
                    f"chain {chain_id} holds {self._counts[chain_id]} samples in {self._file.filename}, "
                    f"fewer than the checkpoint's {sample_count}")
            self._set_layout(init_sample)
            self._counts[chain_id] = int(sample_count)  # later draws are written over
            self._capacity[chain_id] = samples_collected(static_information)
            self._finalized.discard(chain_id)

    def close(self) -> None:
        """Trim, flush and (if this collector opened it) close the file, check it, unlock it.

        Raises :class:`jaxsave.FileChangedError` if the file was deleted, replaced
        or truncated while it was written.
        """
        with self._lock:
            try:
                if self._file.id.valid:
                    self._close_file()
            finally:
                self._on_disk = None
                self._release_lock()

    def _close_file(self) -> None:
        try:
            self._check_on_disk()
            self._trim()
            self._write_checkpoints()
            inode = self._on_disk[:2] if self._on_disk else None
            datasets = [ds.name for ds in self._datasets]
            datasets += [ds.name for dsets in self._chain_datasets.values() for ds in dsets]
        finally:  # a failed write (full disk...) still releases the file
            if self._owned:
                self._file.close()
        if self._owned:
            self._verify_closed(inode, datasets)
