"""The Zarr store a collector writes: locked, opened for a mode, alone or shared.

A store takes one writer at a time. Several ``jax.distributed`` processes may share one
(``shared``): the owner (the writer of chain 0) holds the store and creates, replaces or
continues its root; every other writer holds only its own chains (from ``first_chain``
on) and waits for the owner's root (of this run, ``run_token``, for mode ``"w"``) and
arrays. :class:`StoreWriter` is built with what the collector was given; it reads the
counts of the chains a store holds (mode ``"a"``), which the collector adopts, and checks
a stored structure against the collector's.
"""

from __future__ import annotations

import dataclasses
import os
import time
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np

from jaxsave._core import filelock as _filelock
from jaxsave._store import schema
from jaxsave._store.arguments import check_counts, check_mode, check_sample_stats, check_seconds
from jaxsave._store.location import ZARR_JSON, is_zarr_object
from jaxsave._store.zarr import confined as _confined
from jaxsave._store.zarr import store as _store
from jaxsave._store.zarr.arrays import COMPRESSIONS, StoreArrays
from jaxsave._store.zarr.sample_store import check_header
from jaxsave.errors import (
    FileFormatError,
    FileInUseError,
    JaxsaveError,
    SaverStateError,
)

__all__ = ["StoreWriter", "check_arguments", "run_token", "stored_count", "this_first_chain"]


def check_arguments(
    mode: str, compression: Any, sample_stats: Any, *, seconds: dict[str, Any], counts: dict[str, Any]
) -> None:
    """Refuse :class:`jaxsave.ZarrCollector` arguments of the wrong kind, naming the argument.

    >>> check_arguments("w", None, None, seconds={"flush_interval": -1}, counts={})
    Traceback (most recent call last):
    ValueError: flush_interval must be a finite number of seconds >= 0, got -1
    """
    check_mode(mode)
    if isinstance(compression, str) and compression not in COMPRESSIONS:
        raise ValueError(
            f"compression must be None, one of {COMPRESSIONS} or a zarr codec, got {compression!r}"
        )
    check_sample_stats(sample_stats)
    check_seconds(**seconds)
    check_counts(**counts)


def this_first_chain(shared: bool, chains: int | None, first_chain: int | None) -> int | None:
    """The first global chain this process writes: ``first_chain``, or, in a store ``shared``
    by the ``jax.distributed`` processes, its even share of ``chains`` (which must be given)."""
    if not shared:
        return first_chain
    import jax

    if chains is None:
        raise ValueError(
            "ZarrCollector: several processes write one store (shared), so its chain axis is fixed: "
            "pass chains= (the number of chains of all processes together)"
        )
    if first_chain is None:
        if chains % jax.process_count():
            raise ValueError(
                f"ZarrCollector: {chains} chains do not split evenly over {jax.process_count()} "
                "processes: pass first_chain= (this process's first global chain id)"
            )
        first_chain = jax.process_index() * (chains // jax.process_count())
    return first_chain


def run_token(run_id: str | None) -> str:
    """The id of this run, the same in every process (process 0's, broadcast)."""
    if run_id is not None:
        return str(run_id)
    from jax.experimental import multihost_utils

    mine = np.frombuffer(uuid.uuid4().bytes[:8], np.uint32)
    return "".join(f"{int(x):08x}" for x in np.asarray(multihost_utils.broadcast_one_to_all(mine)))


def stored_count(group: Any, chain_id: int) -> int | None:
    """The count the store holds for chain ``chain_id``; ``None`` if it holds none."""
    try:
        counts = group[schema.COUNTS]
    except KeyError:
        return None
    return int(counts[chain_id]) if chain_id < counts.shape[0] else None


@dataclasses.dataclass(frozen=True)
class StoreWriter:
    """One writer of a store (``source``, named ``name``; ``local``: its directory, if any).

    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "run.zarr")
    >>> writer = StoreWriter(path, None, "run.zarr", path, "w", shared=False, owner=True,
    ...                      first_chain=0, chains=None, token=None, create_timeout=1.0)
    >>> lock = writer.lock()
    >>> group, location, counts = writer.open()
    >>> sorted(group.attrs)[:2], counts
    (['created', 'jaxsave_format'], None)
    >>> lock.release()
    """

    source: Any
    storage_options: dict | None
    name: str
    local: str | None
    mode: str
    shared: bool
    owner: bool
    first_chain: int
    chains: int | None
    token: str | None
    create_timeout: float

    def lock(self) -> _filelock.FileLock:
        """One writer per store: the only writer, or a shared store's owner (chain 0), holds the
        store (a local directory: ``flock`` on ``<dir>.lock``, against other processes too; any
        other store: in this process); every other writer of a shared store holds its own chains
        (``<dir>.chains-<first_chain>.lock``)."""
        mine = "" if self.owner or not self.shared else f".chains-{self.first_chain}"
        if self.local is not None:
            try:
                return _filelock.acquire(self.local + mine)
            except FileInUseError as error:
                if not self.shared:
                    raise
                raise FileInUseError(
                    f"{self.name}: the writer of its chains from {self.first_chain} on (first_chain="
                    f"{self.first_chain}{', the owner that creates the store' if self.owner else ''}) is "
                    f"another collector already; a shared store takes one writer per first_chain (did two "
                    f"processes get the same process_index or first_chain?) ({error})"
                ) from None
        what = "writes this store" if not mine else f"writes its chains from {self.first_chain} on"
        return _filelock.hold(
            _store.identity(self.source) + mine,
            f"{self.name}: another ZarrCollector of this process (pid {os.getpid()}) {what}: one store "
            "takes one writer (a shared store one per process, each with its own first_chain), or their "
            "draws and counts would interleave; close the other collector first (its saver's "
            "postprocess(state), or collector.close()), or write another store",
        )

    def open(self) -> tuple[Any, _store.Location, np.ndarray | None]:
        """Open (the owner: create, replace or continue) the root group; with it, for mode
        ``"a"``, the counts of the chains the store holds (``None``: none, or another mode)."""
        if not self.owner:  # never looks at what the owner may be deleting or creating right now
            if self.mode == "x":
                raise ValueError(
                    "mode='x' is for the writer that creates the store (chain 0); the others use 'w'"
                )
            return self._wait_for_root()
        existing = self._existing()
        if existing is not None and self.mode == "x":
            raise FileExistsError(f"{self.name} exists (mode='x' creates a new store only)")
        if existing is not None and self.mode == "a":
            group, location = existing
            counts = self._stored_counts(group)
            if not self.shared:  # the only writer: its shapes will change
                if location.local is not None:
                    _store.remove_stale_temporaries(location.local)
                _store.drop_consolidated(location)
                group = _store.open_group(self.source, "r+", self.storage_options)[0]
                group.attrs.update(schema.root_attributes(schema.POSTERIOR))
            return group, location, counts
        group, location = _store.open_group(self.source, "w", self.storage_options)
        attrs = {**schema.root_attributes(schema.POSTERIOR), schema.CREATED: schema.created_now()}
        if self.token is not None:
            attrs[schema.RUN] = self.token
        group.attrs.update(attrs)
        return group, location, None

    def check_structure(self, structure: Callable[[], str]) -> None:
        """A store that already describes its leaves (mode "a", a shared store) must describe
        ``structure()`` (:func:`jaxsave._store.schema.structure_json`)."""
        fresh = _store.open_group(self.source, "r", self.storage_options)[0]  # another writer's, maybe
        stored = fresh.attrs.get(schema.STRUCTURE)
        if stored is not None:
            schema.check_same_structure(stored, structure(), self.name)

    def wait_for_arrays(self, arrays: StoreArrays, structure: Callable[[], str]) -> None:
        """Not the owner: wait until the owner created (and ``arrays`` bound) the arrays, then check
        them against ``structure()`` and ``chains``."""
        deadline = time.monotonic() + self.create_timeout
        while not arrays.bind():
            if time.monotonic() > deadline:
                raise SaverStateError(
                    f"ZarrCollector: waited {self.create_timeout:g} s for the writer of chain 0 to create "
                    f"the arrays of {self.name}, in vain (did it start, with the same sample structure?)"
                )
            time.sleep(0.05)
        self.check_structure(structure)
        if arrays.shape[0] != self.chains:
            raise FileFormatError(
                f"{self.name} has {arrays.shape[0]} chains; this writer was told chains={self.chains}"
            )

    def _existing(self) -> tuple[Any, _store.Location] | None:
        """The root group if the store holds a jaxsave store; refuses to take over anything else."""
        if self.local is not None and not is_zarr_object(self.source):
            if not os.path.exists(self.local):
                return None
            if not os.path.isdir(self.local):
                raise FileExistsError(f"{self.name} exists and is not a directory (a Zarr store is one)")
            if _confined.stat_confined(self.local, ZARR_JSON) is None:  # refuses a symlink, FIFO, device
                if os.listdir(self.local):
                    raise FileExistsError(
                        f"{self.name} is a non-empty directory but not a Zarr store; ZarrCollector does not "
                        "delete it: pick another path, or empty it yourself"
                    )
                return None
        try:
            group, location = _store.open_group(self.source, "r+", self.storage_options)
        except FileNotFoundError:
            return None
        except (JaxsaveError, ImportError):
            raise
        except Exception as error:  # zarr's many errors for a broken zarr.json
            raise FileFormatError(
                f"{self.name} cannot be opened as a Zarr store ({type(error).__name__}: {error}); "
                "ZarrCollector does not replace it: delete it yourself"
            ) from error
        attrs = dict(group.attrs.asdict())
        if schema.FORMAT not in attrs:
            if self.mode == "w" and not _store.list_root(location):
                return None  # an empty store (a fresh bucket prefix, memory)
            raise FileFormatError(
                f"{self.name} is a Zarr store not written by jaxsave; ZarrCollector does not replace or "
                "continue it: pick another store, or delete it yourself"
            )
        check_header(attrs, self.name)
        return group, location

    def _wait_for_root(self) -> tuple[Any, _store.Location, np.ndarray | None]:
        """Not the owner: wait until the owner created the root (of this run, for mode "w")."""
        deadline = time.monotonic() + self.create_timeout
        seen = "no store"
        while True:
            try:
                group, location = _store.open_group(self.source, "r+", self.storage_options)
                attrs = dict(group.attrs.asdict())
                ours = schema.FORMAT in attrs
                seen = f"a store of run {attrs.get(schema.RUN)!r}" if ours else "no jaxsave store"
                if ours and (self.token is None or attrs.get(schema.RUN) == self.token):
                    check_header(attrs, self.name)
                    counts = self._stored_counts(group) if self.mode == "a" else None
                    return group, location, counts
            except (JaxsaveError, ImportError):
                raise
            except Exception as error:  # noqa: BLE001 - the owner may be replacing the store right now
                seen = f"{type(error).__name__}: {error}"
            if time.monotonic() > deadline:
                raise SaverStateError(
                    f"ZarrCollector: waited {self.create_timeout:g} s for the writer of chain 0 (process 0) "
                    f"to create {self.name} (run {self.token!r}), in vain (found {seen}); start every "
                    "process with the same store, mode and run_id, or raise create_timeout="
                )
            time.sleep(0.05)

    def _stored_counts(self, group: Any) -> np.ndarray | None:
        """mode "a": the stored chains' counts, checked (``None``: the store counts no chain)."""
        try:
            raw = group[schema.COUNTS][:]
        except KeyError:
            return None
        except Exception as error:  # zarr's many errors for damaged metadata or chunks
            raise FileFormatError(
                f"{self.name}: its {schema.COUNTS!r} cannot be read ({type(error).__name__}: {error}); "
                "ZarrCollector does not continue a damaged store"
            ) from error
        return schema.checked_counts(raw, self.name)
