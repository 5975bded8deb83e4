"""Collectors: where streamed samples go on the host.

A collector receives *blocks*: for each leaf of the sample (in ``jax.tree.leaves``
order) an array of rows ``(n, ...)``, all rows kept. One writer thread per saver
calls it, so a collector sees one call at a time and in order.

The contract is the :class:`Collector` protocol. Subclass :class:`DataCollector`:
the two methods to implement are :meth:`DataCollector.register_chain` and
:meth:`DataCollector.save`; the others have sensible defaults.
"""

from __future__ import annotations

import abc
import json
import math
import numbers
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import jax
import numpy as np

from jaxsave._core import atomic as _atomic
from jaxsave._core import dtypes as _dtypes
from jaxsave._core.tree import pytree_dict_keys
from jaxsave.errors import SaverStateError, StructureMismatchError

__all__ = ["Collector", "DataCollector", "MemoryCollector", "SampleLayout", "sample_layout"]


class SampleLayout(NamedTuple):
    """The shape of one chain's sample: tree structure, leaf key paths and specs."""

    treedef: Any
    keys: list[tuple[str, ...]]
    specs: list[_dtypes.LeafSpec]

    def storage_shape(self, j: int) -> tuple[int, ...]:
        """Shape of one row of leaf ``j`` as stored (key data has an extra axis)."""
        spec = self.specs[j]
        return _dtypes.key_data_shape(spec) if spec.is_key else spec.shape

    def row_dtype(self, j: int) -> np.dtype:
        """The numpy dtype of leaf ``j``'s rows as they leave the device (keys as key data)."""
        spec = self.specs[j]
        return _dtypes.storage_dtype(spec.dtype) if spec.is_key else _dtypes.dtype_from_name(spec.dtype)

    def row_bytes(self, j: int | None = None) -> int:
        """Bytes of one row of leaf ``j`` as stored, or of all leaves if ``j`` is ``None``."""
        if j is None:
            return sum(self.row_bytes(i) for i in range(len(self.specs)))
        return math.prod(self.storage_shape(j)) * self.row_dtype(j).itemsize

    def unflatten(self, leaves: Sequence[Any]) -> Any:
        return jax.tree.unflatten(self.treedef, list(leaves))


def sample_layout(init_sample: Any) -> SampleLayout:
    """The :class:`SampleLayout` of a sample (arrays or ``jax.ShapeDtypeStruct``)."""
    if init_sample is None:
        raise ValueError("a collector needs init_sample to know the shape of the samples")
    leaves, treedef = jax.tree.flatten(init_sample)
    specs = [_dtypes.LeafSpec(tuple(x.shape), _dtypes.leaf_spec(x).dtype) for x in leaves]
    return SampleLayout(treedef, pytree_dict_keys(init_sample), specs)


def nonempty_sample_layout(init_sample: Any, collector: str) -> SampleLayout:
    """:func:`sample_layout`, refusing a sample without array leaves: ``collector`` (a file's or a
    store's) would have nothing to write."""
    sample = sample_layout(init_sample)
    if not sample.specs:
        raise StructureMismatchError(
            f"{collector}: the sample has no array leaves (an empty pytree), so there is nothing to "
            "write; save at least one leaf, or use MemoryCollector"
        )
    return sample


def check_continuable(
    where: str, chain_id: int, count: int | None, sample_count: int, hint: str = ""
) -> None:
    """Refuse to continue chain ``chain_id`` of ``where`` after ``sample_count`` samples (see
    :meth:`Collector.reopen_chain`) if it has no such chain (``count`` is ``None``; ``hint`` says
    what to do) or the chain holds fewer."""
    if count is None:
        raise SaverStateError(f"{where} has no chain {chain_id} to continue{hint}")
    if count < sample_count:
        raise SaverStateError(
            f"chain {chain_id} holds {count} samples in {where}, fewer than the checkpoint's {sample_count}"
        )


def samples_collected(static_information: Any) -> int | None:
    """``static_information.samples_collected`` as an int >= 0, or ``None`` (count unknown).

    Integers only (Python ints, numpy/JAX integer scalars): a bool, float, string or
    array is refused, not read as a count.
    """
    n = getattr(static_information, "samples_collected", None)
    if n is None:
        return None
    dtype = getattr(n, "dtype", None)
    if dtype is None:
        integral = isinstance(n, numbers.Integral) and not isinstance(n, bool)
    else:
        integral = getattr(dtype, "kind", None) in ("i", "u") and tuple(getattr(n, "shape", ())) == ()
    if not integral:
        raise TypeError(
            f"samples_collected must be an integer, got {n!r} (of type {type(n).__name__}; "
            "the number of samples, or None if unknown)"
        )
    try:
        value = int(n)
    except (TypeError, jax.errors.ConcretizationTypeError) as error:
        raise TypeError(
            f"samples_collected must be a concrete integer (a Python int or a JAX scalar "
            f"outside jit), got {n!r}"
        ) from error
    if value < 0:
        raise ValueError(f"samples_collected must be >= 0, got {value}")
    return value


def check_rows(
    layout: SampleLayout, values: Sequence[Any], lead: int, chains: int | None = None, who: str = "collector"
) -> None:
    """Refuse rows unlike the registered sample: ``values[j]`` must be ``(*lead axes, *row shape)``
    of leaf ``j``'s row dtype, all leaves with the same leading axes (``chains`` of them first).

    >>> layout = sample_layout({"x": np.zeros(3, np.float32)})
    >>> check_rows(layout, [np.zeros((2, 5, 3), np.float32)], 2, chains=2)
    >>> check_rows(layout, [np.zeros((2, 5, 4), np.float32)], 2)
    Traceback (most recent call last):
    TypeError: collector: rows of leaf x have shape (4,), the sample's is (3,)
    """
    if len(values) != len(layout.specs):
        raise TypeError(f"{who}: got rows of {len(values)} leaves, the sample has {len(layout.specs)}")
    leads = {np.shape(v)[:lead] for v in values}
    if len(leads) > 1 or (chains is not None and leads and next(iter(leads))[0] != chains):
        raise TypeError(
            f"{who}: the leaves' rows disagree on their leading (chain, draw) axes: {sorted(leads)}"
            + (f" for {chains} chains" if chains is not None else "")
        )
    for j, v in enumerate(values):
        name = "/".join(layout.keys[j]) or "sample"
        if np.shape(v)[lead:] != layout.storage_shape(j):
            raise TypeError(
                f"{who}: rows of leaf {name} have shape {np.shape(v)[lead:]}, the sample's is "
                f"{layout.storage_shape(j)}"
            )
        dtype = np.asarray(v).dtype if not hasattr(v, "dtype") else np.dtype(v.dtype)
        if dtype != layout.row_dtype(j):
            raise TypeError(f"{who}: rows of leaf {name} are {dtype}, the sample's are {layout.row_dtype(j)}")


class BlockSink(Protocol):
    """What a saver's writer thread calls on its collector (part of :class:`Collector`); also
    ``prepare_storage(block_rows)`` where the collector has it (:meth:`DataCollector.prepare_storage`)."""

    def save(self, chain_id: int, values: list[np.ndarray]) -> None: ...

    def save_block(self, chain_ids: list[int], values: list[np.ndarray]) -> None: ...

    def finalize(self, chain_id: int) -> None: ...

    def checkpoint(self, records: dict, spec: Any) -> None: ...


class Collector(BlockSink, Protocol):
    """The whole collector contract: everything a saver calls on its collector.

    :class:`DataCollector` implements it (with defaults for all but
    :meth:`~DataCollector.register_chain` and :meth:`~DataCollector.save`), and so do
    :class:`MemoryCollector` and :class:`jaxsave.HDF5Collector`; mypy checks that
    they do. The saver (:func:`jaxsave.save`) is typed against it, and takes a
    :class:`DataCollector` (which also records the one saver a collector belongs to).
    """

    def register_chain(
        self, init_sample: Any = None, init_checkpoint: Any = None, static_information: Any = None
    ) -> int: ...

    def reopen_chain(
        self,
        chain_id: int,
        sample_count: int,
        init_sample: Any = None,
        init_checkpoint: Any = None,
        static_information: Any = None,
    ) -> None: ...

    def finished(self, chain_id: int) -> Any: ...

    def close(self) -> None: ...

    def resume(self) -> tuple[dict, Any]: ...

    def exit_note(self) -> str: ...


class CollectorOwner(Protocol):
    """The saver a :class:`DataCollector` belongs to, as the collector sees it."""

    def drain(self) -> None:
        """Return once everything the sampler sent is stored in the collector."""


class DataCollector(abc.ABC):
    """Base class of collectors (compatible with the older ``io`` module's).

    Subclasses implement :meth:`register_chain` and :meth:`save`. Unlike the older
    module, :meth:`save` receives a block of kept rows per leaf, not one sample.
    Every ``DataCollector`` is a :class:`Collector`.
    """

    _owner: CollectorOwner | None = None

    @abc.abstractmethod
    def register_chain(
        self,
        init_sample: Any = None,
        init_checkpoint: Any = None,
        static_information: Any = None,
    ) -> int:
        """Get ready for a new chain whose samples look like ``init_sample``; return its id."""

    @abc.abstractmethod
    def save(self, chain_id: int, values: list[np.ndarray]) -> None:
        """Store rows of chain ``chain_id``: ``values[j]`` has shape ``(n, ...)`` for leaf ``j``.

        The arrays may be views of memory that is reused after the call: copy
        what you keep.
        """

    def save_block(self, chain_ids: list[int], values: list[np.ndarray]) -> None:
        """Store the same number of rows for several chains: ``values[j]`` is ``(chains, n, ...)``."""
        for i, chain in enumerate(chain_ids):
            self.save(chain, [leaf[i] for leaf in values])

    def prepare_storage(self, block_rows: int) -> None:  # noqa: B027  (optional: a default that does nothing)
        """Called on the writer thread once the loop that saves is traced, before its first
        block (of up to ``block_rows`` rows a chain): make room for the chains registered."""

    def finalize(self, chain_id: int) -> None:  # noqa: B027  (optional: a default that does nothing)
        """Called on the writer thread after the last block of a chain."""

    def finished(self, chain_id: int) -> Any:
        """Called by ``postprocess`` on the main thread; returns the chain's samples or ``None``."""
        return None

    def close(self) -> None:  # noqa: B027  (optional: a default that does nothing)
        """Called once every registered chain is finished: release files and memory."""

    def exit_note(self) -> str:
        """What becomes of the samples it received when the interpreter exits before
        ``postprocess`` (the end of the exit warning's sentence, whose subject is those samples)."""
        return f"were handed to {type(self).__name__}, which is closed"

    def reopen_chain(
        self,
        chain_id: int,
        sample_count: int,
        init_sample: Any = None,
        init_checkpoint: Any = None,
        static_information: Any = None,
    ) -> None:
        """Continue chain ``chain_id`` after its first ``sample_count`` samples, dropping later ones."""
        raise SaverStateError(f"{type(self).__name__} cannot continue a chain from a checkpoint")

    def checkpoint(self, records: dict, spec: Any) -> None:
        """Store checkpoints ``{chain_id: ChainCheckpoint}`` of a tree shaped like ``spec``.

        Called on the writer thread, after the samples the checkpoints count are
        stored. The default keeps them in memory.
        """
        self._checkpoints = {**getattr(self, "_checkpoints", {}), **records}
        self._checkpoint_spec = spec

    def resume(self) -> tuple[dict, Any]:
        """The stored ``({chain_id: ChainCheckpoint}, spec)``, the latest per chain."""
        return dict(getattr(self, "_checkpoints", {})), getattr(self, "_checkpoint_spec", None)

    def _attach(self, owner: CollectorOwner) -> None:
        if self._owner is not None and self._owner is not owner:
            raise SaverStateError(
                f"this {type(self).__name__} already belongs to another saver; "
                "create one collector per jaxsave.save(...)"
            )
        self._owner = owner


def drain_writer(collector: DataCollector) -> None:
    """Wait until the saver that owns ``collector`` has stored what its sampler sent."""
    if collector._owner is not None:
        collector._owner.drain()


class _MemoryChain:
    """One chain's rows, in arrays that grow geometrically (doubling) as blocks come.

    Rows are copied again only at each doubling (amortised once). Allocations are
    ``np.empty``: rows not yet written take no memory, only address space. A
    known count small enough (at most :attr:`PREALLOC_BYTES` per chain) is
    allocated at once; a larger one only caps the growth, so an over-estimate
    reserves nothing.
    """

    #: The first allocation of a chain holds at least this many bytes.
    FIRST_BYTES = 1 * 2**20
    #: A known count up to this many bytes per chain is allocated at once.
    PREALLOC_BYTES = 64 * 2**20

    def __init__(self, sample: SampleLayout, capacity: int | None):
        self.sample = sample
        self.capacity = capacity
        self.rows: list[np.ndarray] | None = None
        self.allocated = 0
        self.count = 0
        self.done = False

    def append(self, values: list[np.ndarray]) -> None:
        n = len(values[0]) if values else 0
        needed = self.count + n
        if self.rows is None or needed > self.allocated:
            self._grow(needed)
        assert self.rows is not None  # allocated by _grow
        for rows, block in zip(self.rows, values):
            rows[self.count : needed] = block
        self.count = needed

    def _size(self, needed: int) -> int:
        """Rows to allocate for ``needed``: double, at least ``FIRST_BYTES``, at most the count."""
        row_bytes = max(1, self.sample.row_bytes())
        size = max(needed, 2 * self.allocated, self.FIRST_BYTES // row_bytes)
        if self.capacity is not None and needed <= self.capacity:
            if self.capacity * row_bytes <= self.PREALLOC_BYTES:
                return self.capacity  # all of it at once: one allocation, no copy
            size = min(size, self.capacity)
        return size

    def _grow(self, needed: int) -> None:
        size = self._size(needed)
        grown = [
            np.empty((size, *self.sample.storage_shape(j)), self.sample.row_dtype(j))
            for j in range(len(self.sample.specs))
        ]
        if self.rows is not None:
            for new, old in zip(grown, self.rows):
                new[: self.count] = old[: self.count]
        self.rows, self.allocated = grown, size

    def samples(self) -> list[np.ndarray]:
        if self.rows is None:
            return [
                np.zeros((0, *self.sample.storage_shape(j)), self.sample.row_dtype(j))
                for j in range(len(self.sample.specs))
            ]
        return [rows[: self.count] for rows in self.rows]


class MemoryCollector(DataCollector):
    """Keeps samples in host memory as numpy arrays; ``postprocess`` returns them.

    Args:
      save_dir: if given, each chain is also written to ``save_dir/chain_{id}.npz``
        (the directory created if missing, with its parents) when it finishes (keys
        are the ``/``-joined dictionize key paths), atomically:
        a failed write (full disk...) leaves no partial file and raises an
        ``OSError`` naming the file from ``postprocess``; the samples are then
        still in memory, returned by :meth:`samples`.

    >>> import jax, jax.numpy as jnp, jaxsave
    >>> init, save, postprocess = jaxsave.save(jaxsave.MemoryCollector())
    >>> state = init({"x": jnp.zeros(2)}, None, jaxsave.static_information(samples_collected=3))
    >>> def step(state, i):
    ...     return save(state, i % 2 == 0, {"x": jnp.full(2, i, jnp.float32)})
    >>> state, _ = jax.lax.scan(step, state, jnp.arange(5))
    >>> postprocess(state, None)["samples"]["x"][:, 0]
    array([0., 2., 4.], dtype=float32)
    """

    def __init__(self, save_dir: str | os.PathLike | None = None):
        self._dir = None if save_dir is None else Path(save_dir)
        self._chains: list[_MemoryChain] = []

    def register_chain(
        self, init_sample=None, init_checkpoint=None, static_information=None, **unused
    ) -> int:
        capacity = samples_collected(static_information)
        sample = sample_layout(init_sample)
        if self._dir is not None:
            _npz_names(sample.keys)  # refused now, not when the run is over
        self._chains.append(_MemoryChain(sample, capacity))
        return len(self._chains) - 1

    def save(self, chain_id: int, values: list[np.ndarray]) -> None:
        self._chains[chain_id].append(values)

    def finalize(self, chain_id: int) -> None:
        chain = self._chains[chain_id]
        chain.done = True
        if self._dir is not None:
            self._write_npz(chain_id, chain)

    def _write_npz(self, chain_id: int, chain: _MemoryChain) -> None:
        assert self._dir is not None  # only called with a directory
        path = self._dir / f"chain_{chain_id}.npz"
        names = _npz_names(chain.sample.keys)
        arrays = {name: _dtypes.to_storable(a) for name, a in zip(names, chain.samples())}
        dtypes = {name: spec.dtype for name, spec in zip(names, chain.sample.specs)}
        arrays["__jaxsave__"] = np.array(json.dumps({"format": 1, "dtypes": dtypes}))
        try:
            self._dir.mkdir(parents=True, exist_ok=True)
            _atomic.remove_stale_temporaries(self._dir, target=path.name)
            with _atomic.atomic_write(path) as f:
                np.savez(f, **arrays)  # type: ignore[arg-type]
        except OSError as error:
            raise OSError(
                error.errno,
                f"MemoryCollector could not write chain {chain_id} to {os.fspath(path)!r} "
                f"({error.strerror or error}); nothing was left there, and the chain's "
                f"{chain.count} samples are still in memory: MemoryCollector.samples({chain_id}) "
                "returns them",
            ) from error

    def reopen_chain(
        self,
        chain_id: int,
        sample_count: int,
        init_sample: Any = None,
        init_checkpoint: Any = None,
        static_information: Any = None,
    ) -> None:
        count = self._chains[chain_id].count if 0 <= chain_id < len(self._chains) else None
        check_continuable("this MemoryCollector", chain_id, count, sample_count)
        chain = self._chains[chain_id]
        if chain.done and chain.rows is not None:  # postprocess handed out views: write into new arrays
            fresh = [np.empty_like(rows) for rows in chain.rows]  # untouched rows stay free
            for new, old in zip(fresh, chain.rows):
                new[:sample_count] = old[:sample_count]
            chain.rows = fresh
        chain.count = sample_count
        chain.done = False

    def exit_note(self) -> str:
        return (
            "were kept in host memory (MemoryCollector) and are lost as the process ends; "
            "call postprocess(state) before the script ends to get them"
        )

    def finished(self, chain_id: int) -> Any:
        if not self._chains[chain_id].done:
            raise SaverStateError(f"chain {chain_id} has not been finalized")
        return self.samples(chain_id)

    def samples(self, chain_id: int) -> Any:
        """The samples of chain ``chain_id`` received so far, as a pytree of ``(draw, ...)`` arrays.

        After ``postprocess`` these are all of them, even when it raised because
        ``save_dir`` could not be written.
        """
        if not 0 <= chain_id < len(self._chains):
            raise SaverStateError(f"this MemoryCollector has no chain {chain_id}")
        chain = self._chains[chain_id]
        leaves = [
            _dtypes.from_storable(a, spec.dtype) if spec.is_key else a
            for a, spec in zip(chain.samples(), chain.sample.specs)
        ]
        return chain.sample.unflatten(leaves)


def _npz_names(keys: list[tuple[str, ...]]) -> list[str]:
    """The ``.npz`` member name of each leaf (its ``/``-joined key path); refuses ambiguous ones."""
    names = ["/".join(key) for key in keys]
    seen: dict[str, tuple[str, ...]] = {"__jaxsave__": ("__jaxsave__",)}
    for key, name in zip(keys, names):
        if any(part == "" or "\0" in part for part in key):
            raise StructureMismatchError(
                f"MemoryCollector(save_dir=...): the sample key {key!r} has an empty part or a NUL "
                "character, which a .npz member name cannot hold"
            )
        if name in seen:
            raise StructureMismatchError(
                f"MemoryCollector(save_dir=...): the sample keys {seen[name]!r} and {key!r} both "
                f"become the .npz member {name!r}"
            )
        seen[name] = key
    return names


if TYPE_CHECKING:  # the type checker proves that the collectors satisfy the contract

    def _data_collector_is_a_collector(collector: DataCollector) -> Collector:
        return collector

    def _memory_collector_is_a_collector(collector: MemoryCollector) -> Collector:
        return collector
