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

import logging
import os
import threading
import time
import warnings
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np

from jaxsave._serialize.treespec import encode_structure
from jaxsave._store import schema
from jaxsave._store.arguments import check_counts, check_mode, check_sample_stats, check_seconds
from jaxsave._store.hdf5 import sample_file
from jaxsave._store.hdf5.datasets import ChainRows, HDF5Datasets
from jaxsave._store.hdf5.held_file import HeldFile
from jaxsave._store.hdf5.owner import OwnedFile
from jaxsave._store.names import StatsSpec, leaf_entries
from jaxsave._stream import resume as _resume
from jaxsave.collectors import (
    Collector,
    DataCollector,
    check_continuable,
    nonempty_sample_layout,
    samples_collected,
)
from jaxsave.errors import JaxsaveError, SaverStateError, StructureMismatchError

logger = logging.getLogger("jaxsave")

__all__ = ["HDF5Collector", "FORMAT_VERSION"]

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


class HDF5Collector(DataCollector):
    """Write samples to an HDF5 file, in blocks, from a writer thread.

    Args:
      file: a path, or an open, writable ``h5py.File`` (which you then close yourself).
      layout: ``"posterior"`` (ArviZ/xarray layout, default) or ``"chains"``
        (the older ``/chain~{id}/...`` layout).
      mode: how a path is opened: ``"w"`` (create or truncate, default), ``"x"``
        (fail if it exists) or ``"a"`` (continue an existing file: ``init(...,
        resume=ckpt)`` continues its chains from a checkpoint; a plain ``init`` adds
        new chains after the ones it holds). A path takes one writer at a time: the
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
        check_mode(mode)
        if sample_stats is not None and layout != schema.POSTERIOR:
            raise ValueError("sample_stats= needs layout='posterior'")
        check_sample_stats(sample_stats)
        check_counts(optional=False, flush_every=flush_every)
        check_seconds(flush_interval=flush_interval, checkpoint_interval=checkpoint_interval)
        self.layout = layout
        self.compression = compression
        self.flush_every = int(flush_every)
        self.flush_interval = float(flush_interval)
        self.fsync = bool(fsync)
        self.checkpoint_interval = float(checkpoint_interval)
        self._stats = sample_stats
        self._lock = threading.RLock()
        self._treespec: dict | None = None
        self._committed = -float("inf")
        self._blocks = 0
        self._warned_swmr_change = False
        self._rows = ChainRows()  # the chains' counts, filled from the file below
        self._held = self._open(file, mode, swmr)
        # In a file that already holds chains (mode "a"), they keep their ids and counts.
        self._rows.adopt(sample_file.read_counts(self._held.file).tolist())
        self._finalized: set[int] = set(range(len(self._rows.counts)))  # until a chain is reopened
        self._datasets = HDF5Datasets.for_layout(layout, self._held, compression, self._rows)
        self._newest = _resume.NewestCheckpoints(
            self.checkpoint_interval,
            self._read_checkpoints,
            lambda records, spec: _resume.write_file(self.checkpoint_path, records, spec),
            commit=self._commit,
        )

    def _open(self, file: str | os.PathLike | h5py.File, mode: str, swmr: bool | None) -> HeldFile:
        """A user's open file, or the path opened with ``mode`` and locked (released on failure)."""
        if isinstance(file, h5py.File):
            return HeldFile.given(file, swmr=swmr, layout=self.layout)
        owner = OwnedFile(os.fspath(file), written=self._rows.written)
        try:
            return HeldFile.create(
                owner,
                mode,
                swmr=True if swmr is None else bool(swmr),
                layout=self.layout,
                sidecars=(_resume.CHECKPOINT_SUFFIX,),
            )
        except BaseException:
            owner.release()
            raise

    @property
    def file(self) -> h5py.File:
        """The open ``h5py.File``."""
        return self._held.file

    @property
    def swmr(self) -> bool:
        """Whether the file is written in single-writer / multiple-reader mode."""
        return self._held.swmr

    @property
    def _counts(self) -> list[int]:
        """The rows each chain holds (raised as blocks are written)."""
        return self._rows.counts

    # -- registration ----------------------------------------------------------------

    def register_chain(
        self, init_sample=None, init_checkpoint=None, static_information=None, **unused
    ) -> int:
        with self._lock:
            if self._set_sample(init_sample):
                structure = self._structure_json()
                self._held.change(lambda: self._held.file.attrs.__setitem__(schema.STRUCTURE, structure))
            if self._held.reopen():  # closed by close() after an earlier run: the handles are gone
                self._datasets.forget()
            if self._held.owner is None and self.file.swmr_mode and not self._warned_swmr_change:
                self._warned_swmr_change = True
                warnings.warn(
                    f"jaxsave: chain {len(self._counts)} is added to the h5py.File "
                    f"{self._held.filename!r} after the first block, in SWMR mode: its datasets are "
                    "created in place, which SWMR readers and crash safety do not cover; pass a "
                    "path (changed on a copy) or init every chain before running to keep them",
                    RuntimeWarning,
                    stacklevel=4,
                )
            return self._rows.add(samples_collected(static_information))

    def _set_sample(self, init_sample: Any) -> bool:
        """Record the samples' layout (first chain: returns True; a file continued in mode "a" must
        hold samples of the same structure) or check that it matches."""
        sample = nonempty_sample_layout(init_sample, "HDF5Collector")
        if not self._datasets.has_sample:
            entries = leaf_entries(sample.keys, self._stats, self.layout)
            stored = self.file.attrs.get(schema.STRUCTURE)
            if stored is not None:
                ours = schema.structure_json(sample.keys, entries, sample.specs, str(sample.treedef), None)
                schema.check_same_structure(stored, ours, repr(self._held.filename))
            self._datasets.set_sample(sample, entries)
            self._treespec = _encode_treespec(init_sample)
            return True
        known = self._datasets.sample
        if sample.keys != known.keys or sample.specs != known.specs:
            raise StructureMismatchError(
                "all chains in one HDF5Collector must have samples of the same structure"
            )
        return False

    def _structure_json(self) -> str:
        sample = self._datasets.sample
        return schema.structure_json(
            sample.keys, self._datasets.entries, sample.specs, str(sample.treedef), self._treespec
        )

    # -- writing (writer thread) ---------------------------------------------------------

    def _require_open(self) -> None:
        """Refuse to write into a file that was closed under the collector (by the user)."""
        if not self.file.id.valid:
            raise SaverStateError(
                f"the h5py.File {self._held.filename!r} given to HDF5Collector was closed while the "
                "sampler was still saving to it; keep it open until postprocess has returned"
            )
        self._held.check_size()

    def save(self, chain_id: int, values: list[np.ndarray]) -> None:
        with self._lock:
            self._require_open()
            self._datasets.check_rows(values, 1)
            self._datasets.append(chain_id, values)
            self._after_block()

    def save_block(self, chain_ids: list[int], values: list[np.ndarray]) -> None:
        with self._lock:
            self._require_open()
            self._datasets.check_rows(values, 2, chains=len(chain_ids))
            self._datasets.append_block(chain_ids, values)
            self._after_block()

    def prepare_storage(self, block_rows: int) -> None:
        """Create the datasets of the chains registered (on the writer thread, while the loop
        compiles): a copy of the file, renamed over it, that the first block would make."""
        with self._lock:
            if self._datasets.has_sample and self._counts:
                self._require_open()
                self._datasets.prepare(block_rows)

    def _after_block(self) -> None:
        self._blocks += 1
        if (
            self.flush_every
            and self._blocks % self.flush_every == 0
            and time.monotonic() - self._committed >= self.flush_interval
        ):
            self._commit()

    def _commit(self) -> None:
        """Flush the rows, then raise the counts and flush again: counts never run ahead of data."""
        self._held.check_on_disk()
        self.file.flush()
        self._datasets.write_counts()
        self.file.flush()
        if self.fsync:
            os.fsync(self.file.id.get_vfd_handle())
        self._held.check_on_disk(baseline=True)
        self._committed = time.monotonic()

    def finalize(self, chain_id: int) -> None:
        with self._lock:
            self._require_open()
            self._finalized.add(chain_id)
            self._datasets.finish_chain(chain_id)
            if len(self._finalized) == len(self._counts):
                self._trim()
                self._newest.write()

    def _trim(self) -> None:
        """Cut preallocated draws down to what was kept, and record the final counts."""
        if self._datasets.has_sample and self._counts:
            self._datasets.trim()
            self._commit()

    # -- checkpoints and resume ------------------------------------------------------------

    @property
    def checkpoint_path(self) -> str:
        """Where checkpoints go: next to the samples file, ``<file>.ckpt``."""
        return self._held.filename + _resume.CHECKPOINT_SUFFIX

    def checkpoint(self, records: dict, spec: Any) -> None:
        """Keep the newest checkpoints; write them if ``checkpoint_interval`` has passed since
        the last write."""
        with self._lock:
            self._require_open()
            if self._newest.keep(records, spec):
                self._newest.write()

    def _read_checkpoints(self) -> tuple[dict, Any]:
        if os.path.exists(self.checkpoint_path):
            return _resume.read_file(self.checkpoint_path)
        return {}, None

    def resume(self) -> tuple[dict, Any]:
        with self._lock:
            if self._newest.pending and self.file.id.valid:
                self._newest.write()
        return self._read_checkpoints()

    def reopen_chain(
        self,
        chain_id: int,
        sample_count: int,
        init_sample: Any = None,
        init_checkpoint: Any = None,
        static_information: Any = None,
    ) -> None:
        """Continue chain ``chain_id`` of this file after its first ``sample_count`` samples."""
        with self._lock:
            count = self._counts[chain_id] if 0 <= chain_id < len(self._counts) else None
            check_continuable(self._held.filename, chain_id, count, sample_count, " (open it with mode='a')")
            self._set_sample(init_sample)
            # Later draws are written over.
            self._rows.restart(chain_id, sample_count, samples_collected(static_information))
            self._finalized.discard(chain_id)

    def exit_note(self) -> str:
        return f"are written to {self._held.filename!r} and the file is closed"

    def close(self) -> None:
        """Trim, flush and (if this collector opened it) close the file, check it, unlock it.

        Raises :class:`jaxsave.FileChangedError` if the file was deleted, replaced
        or truncated while it was written.
        """
        with self._lock:
            try:
                if self.file.id.valid:
                    self._close_file()
            finally:
                if self._held.owner is not None:
                    self._held.owner.release()

    def _close_file(self) -> None:
        owner = self._held.owner
        try:
            self._held.check_on_disk()
            self._trim()
            self._newest.write()
            identity = owner.identity if owner is not None else None
            datasets = self._datasets.names()
        finally:  # a failed write (full disk...) still releases the file
            if owner is not None:
                self.file.close()
        if owner is not None:
            owner.verify_closed(identity, datasets)


if TYPE_CHECKING:

    def _is_a_collector(collector: HDF5Collector) -> Collector:
        return collector  # the type checker proves that HDF5Collector satisfies the contract
