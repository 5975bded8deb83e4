"""Checkpoints of the sampler state, taken inside jit and written with the sample blocks.

Checkpoints travel with the samples: at every multiple of ``checkpoint_every``
the rows gathered so far are flushed (a full block or not), and that flush also
carries the ``solver_state`` (and ``scheduler_state``) given to ``save`` at that
step, with the step and the number of kept samples. Nothing is copied or
tested on the other steps, and there is no extra callback. The writer stores a
checkpoint only after its block, so it never refers to samples that are not
stored. :func:`resume` reads the last one back; ``init(..., resume=checkpoint)``
continues the same chains.
"""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Callable
from typing import Any, BinaryIO, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxsave._core import dtypes as _dtypes
from jaxsave._core.tree import check_like
from jaxsave._serialize import treespec as _treespec
from jaxsave._store.location import check_storage_options, is_zarr
from jaxsave.errors import JaxsaveError, SaverStateError, StructureMismatchError, UnregisteredNameError

__all__ = ["Checkpoint", "ChainCheckpoint", "resume"]

#: A samples file ``run.h5`` keeps its checkpoints in ``run.h5.ckpt``.
CHECKPOINT_SUFFIX = ".ckpt"


class ChainCheckpoint(NamedTuple):
    """One chain's checkpoint as a collector stores it: host arrays, keys as key data."""

    step: int
    sample_count: int
    leaves: list[np.ndarray]


class Checkpoint(NamedTuple):
    """The last complete checkpoint of one or more chains.

    With several chains, ``solver_state`` and ``scheduler_state`` have a leading
    chain axis (in ``chain_ids`` order) and ``step``/``sample_count`` are arrays.
    """

    solver_state: Any
    scheduler_state: Any
    step: np.ndarray
    sample_count: np.ndarray
    chain_ids: np.ndarray


def checkpoint_tree(solver_state: Any, scheduler_state: Any) -> dict:
    return {"solver_state": solver_state, "scheduler_state": scheduler_state}


def to_device_leaves(tree: Any) -> list[jax.Array]:
    return [jax.random.key_data(x) if _dtypes.is_key(x) else jnp.asarray(x) for x in jax.tree.leaves(tree)]


def broadcast_unbatched(tree: Any, batched: Any, size: int) -> Any:
    """Give every leaf that ``batched`` marks as unbatched a leading axis of ``size`` (vmap rules)."""
    return jax.tree.map(lambda x, b: x if b else jnp.broadcast_to(x, (size, *jnp.shape(x))), tree, batched)


def records(
    chains: np.ndarray, steps: np.ndarray, saved: np.ndarray, leaves: list[np.ndarray], pick: np.ndarray
) -> dict[int, ChainCheckpoint]:
    """Host-side: the checkpoints of chains ``chains[pick]``, from flattened (chain-major) arrays."""
    return {
        int(chains[i]): ChainCheckpoint(int(steps[i]), int(saved[i]), [np.array(x[i]) for x in leaves])
        for i in np.flatnonzero(pick)
    }


class UndecodedSpec(NamedTuple):
    """A checkpoint's structure that names classes not registered in this process (yet)."""

    structure: dict
    leaves: list[jax.ShapeDtypeStruct]


def decoded_spec(structure: Any, leaves: list[jax.ShapeDtypeStruct]) -> Any:
    """The tree of ``leaves`` that ``structure`` describes, or an :class:`UndecodedSpec`."""
    try:
        return _treespec.decode_structure(structure, leaves)
    except UnregisteredNameError:
        return UndecodedSpec(structure, leaves)


def assemble(stored: dict[int, ChainCheckpoint], spec: Any, like: Any = None) -> Checkpoint:
    """Stack per-chain records into a :class:`Checkpoint` shaped like ``spec``; each record's
    leaves must be of the shapes and dtypes ``spec`` says."""
    if not stored:
        raise JaxsaveError("no checkpoint has been written yet")
    if like is not None:
        like = checkpoint_tree(*like) if isinstance(like, tuple) else like
        like_spec = jax.eval_shape(lambda t: t, like)
        if isinstance(spec, UndecodedSpec):
            _check_undecoded(spec, like_spec)
        elif spec is not None:  # as stored: Python scalars as jnp.asarray has them (weak float32...)
            check_like(like_spec, spec, "the checkpoint template")
        spec = like_spec
    if spec is None or isinstance(spec, UndecodedSpec):
        raise JaxsaveError(
            "the checkpoint's sampler state uses classes that are not registered in this process: pass "
            "like=(solver_state_template, scheduler_state_template) to resume"
        )
    ids = np.array(sorted(stored), dtype=np.int64)
    flat = jax.tree_util.tree_flatten_with_path(spec)[0]
    paths, specs = [p for p, _ in flat], [_dtypes.leaf_spec(x) for _, x in flat]
    treedef = jax.tree.structure(spec)
    per_chain = []
    for chain in ids.tolist():
        rec = stored[chain]
        if len(rec.leaves) != len(specs):
            raise StructureMismatchError(
                f"checkpoint of chain {chain} has {len(rec.leaves)} leaves, the template {len(specs)}"
            )
        for path, leaf, s in zip(paths, rec.leaves, specs):
            shape, dtype = _stored_form(s)
            if (np.shape(leaf), np.asarray(leaf).dtype) != (shape, dtype):
                raise StructureMismatchError(
                    f"checkpoint of chain {chain}: leaf {jax.tree_util.keystr(path)} is stored as "
                    f"{np.asarray(leaf).dtype}{list(np.shape(leaf))}, its structure says {s.dtype}"
                    f"{list(s.shape)} (stored as {dtype}{list(shape)}): a damaged checkpoint, or "
                    "writers of one store that checkpoint different sampler states"
                )
        per_chain.append(rec.leaves)
    stacked = []
    for j, s in enumerate(specs):
        arrays = [leaves[j] for leaves in per_chain]
        value = arrays[0] if len(ids) == 1 else np.stack(arrays)
        stacked.append(_dtypes.from_storable(value, s.dtype) if s.is_key else value)
    tree = jax.tree.unflatten(treedef, stacked)
    steps = np.array([stored[c].step for c in ids.tolist()])
    counts = np.array([stored[c].sample_count for c in ids.tolist()])
    if len(ids) == 1:
        steps, counts = steps[0], counts[0]
    return Checkpoint(tree["solver_state"], tree["scheduler_state"], steps, counts, ids)


def _stored_form(spec: _dtypes.LeafSpec) -> tuple[tuple[int, ...], np.dtype]:
    """The shape and dtype a checkpoint record holds a leaf of ``spec`` in (keys: key data)."""
    if spec.is_key:
        return _dtypes.key_data_shape(spec), np.dtype(np.uint32)
    return spec.shape, _dtypes.dtype_from_name(spec.dtype)


def _check_undecoded(stored: UndecodedSpec, like: Any) -> None:
    """Refuse a template ``like`` (shapes and dtypes) that is not the stored structure.

    Encoding ``like`` registers its node classes, so the stored structure usually decodes now
    and is compared leaf by leaf. Where it does not (a class moved to another module since),
    the two must agree in all but the classes' names (:func:`check_same_spec`).
    """
    _treespec.encode_structure(like, strict=False)  # registers like's node classes
    spec = decoded_spec(stored.structure, stored.leaves)
    if isinstance(spec, UndecodedSpec):
        check_same_spec(stored, like, "the checkpoint template")
    else:
        check_like(like, spec, "the checkpoint template")


def describe_spec(spec: Any) -> tuple[Any, list[_dtypes.LeafSpec]]:
    """A checkpoint's structure as its description (without its classes' names, as
    :func:`_check_undecoded` compares them) and leaf specs, decoded or not."""
    if isinstance(spec, UndecodedSpec):
        return _untyped(spec.structure.get("root")), [_dtypes.leaf_spec(x) for x in spec.leaves]
    structure, leaves = _treespec.encode_structure(spec, strict=False)
    return _untyped(structure["root"]), [_dtypes.leaf_spec(x) for x in leaves]


def check_same_spec(stored: Any, spec: Any, what: str) -> None:
    """Refuse ``spec`` unless it is the checkpoint structure ``stored`` but for its classes'
    names (one stored file or store holds checkpoints of one structure)."""
    ours, theirs = describe_spec(spec), describe_spec(stored)
    if ours == theirs:
        return
    head = f"{what} does not match the checkpoints stored already (another sampler state)"
    if ours[0] != theirs[0]:  # nodes, field names, keys or static values
        raise StructureMismatchError(f"{head}: theirs is {_brief(theirs[0])}, {what}'s {_brief(ours[0])}")
    flat = jax.tree_util.tree_flatten_with_path(spec)[0]
    differ = [
        f"leaf {jax.tree_util.keystr(path)} is {a.dtype}{list(a.shape)}, stored {b.dtype}{list(b.shape)}"
        for (path, _), a, b in zip(flat, ours[1], theirs[1])
        if a != b
    ]
    raise StructureMismatchError(f"{head}: " + "; ".join(differ[:4]))


def _brief(root: Any) -> str:
    """A structure description's root (without classes' names), short enough for a message."""
    text = json.dumps(_untyped(root), separators=(",", ":"))
    return text if len(text) <= 160 else text[:157] + "..."


def _untyped(node: Any) -> Any:
    """A structure description without its classes' names and leaf kinds."""
    if isinstance(node, dict):
        return {k: _untyped(v) for k, v in node.items() if k != "type" or "$" in node}
    if isinstance(node, list):
        return [_untyped(v) for v in node]
    return "leaf" if isinstance(node, str) and node in _treespec.ARRAY_KINDS else node


def _shape_dtype(spec: _dtypes.LeafSpec) -> jax.ShapeDtypeStruct:
    if spec.is_key:
        _dtypes.key_data_shape(spec)  # refuses unknown implementations
        dtype = jax.eval_shape(lambda: jax.random.key(0, impl=spec.key_impl)).dtype
        return jax.ShapeDtypeStruct(spec.shape, dtype)
    return jax.ShapeDtypeStruct(spec.shape, _dtypes.dtype_from_name(spec.dtype))


def write_file(path: str | BinaryIO, records: dict[int, ChainCheckpoint], spec: Any) -> None:
    """Atomically replace the checkpoint file ``path`` with ``records`` (every chain's latest),
    or write them to the binary file ``path``."""
    from jaxsave.serialization import save_pytree

    structure, spec_leaves = _treespec.encode_structure(spec)
    tree = {
        str(chain): {
            "step": np.int64(r.step),
            "sample_count": np.int64(r.sample_count),
            "leaves": list(r.leaves),
        }
        for chain, r in sorted(records.items())
    }
    leaves = [list(_dtypes.leaf_spec(x)) for x in spec_leaves]
    save_pytree(
        path,
        tree,
        metadata={"kind": "jaxsave-checkpoint", "structure": structure, "leaves": leaves},
        format="jaxsave",
    )


def read_file(path: str | BinaryIO) -> tuple[dict[int, ChainCheckpoint], Any]:
    """The records of a checkpoint file (a path or a binary file) and the structure they fill
    (an :class:`UndecodedSpec` if it names classes not registered here)."""
    from jaxsave.errors import FileFormatError
    from jaxsave.serialization import load_pytree, read_metadata

    meta = read_metadata(path)
    if not isinstance(meta, dict) or meta.get("kind") != "jaxsave-checkpoint":
        raise FileFormatError(f"{path} is not a jaxsave checkpoint file")
    if not isinstance(path, str):
        path.seek(0)
    tree = load_pytree(path, as_numpy=True)
    if not isinstance(tree, dict):
        raise FileFormatError(f"{path}: malformed checkpoint")
    try:
        records = {
            int(chain): ChainCheckpoint(
                int(r["step"]), int(r["sample_count"]), [np.asarray(x) for x in r["leaves"]]
            )
            for chain, r in tree.items()
        }
        leaf_specs = [_shape_dtype(_dtypes.LeafSpec(tuple(shape), dtype)) for shape, dtype in meta["leaves"]]
    except (KeyError, TypeError, ValueError, OverflowError) as error:
        raise FileFormatError(f"{path}: malformed checkpoint ({error})") from error
    return records, decoded_spec(meta["structure"], leaf_specs)  # unregistered: resume needs like=


def read_store_key(location: Any, key: str) -> tuple[dict[int, ChainCheckpoint], Any]:
    """The records in key ``key`` of a Zarr store (a :class:`jaxsave._store.zarr.store.Location`)
    and their structure; ``({}, None)`` if there is no such key."""
    from jaxsave._store.zarr import store as _zarr_store

    data = _zarr_store.get_bytes(location, key)
    if data is None:
        return {}, None
    return read_file(io.BytesIO(data))


class NewestCheckpoints:
    """The newest checkpoint of each chain of a collector, stored at most once per ``interval`` s.

    ``load()`` returns what the storage holds (``({}, None)`` if nothing) and ``store(records,
    spec)`` replaces it whole. :meth:`write` calls the collector's ``commit()`` first, so a stored
    checkpoint never counts samples that are not stored.

    >>> stored = []
    >>> store = lambda r, s: stored.append(sorted(r))
    >>> newest = NewestCheckpoints(60.0, lambda: ({}, None), store, commit=lambda: None)
    >>> newest.keep({0: "a"}, None), newest.pending  # the first one is due at once
    (True, True)
    >>> newest.write()
    >>> newest.keep({1: "b"}, None), stored  # the next is due 60 s later
    (False, [[0]])
    """

    def __init__(
        self,
        interval: float,
        load: Callable[[], tuple[dict[int, ChainCheckpoint], Any]],
        store: Callable[[dict[int, ChainCheckpoint], Any], None],
        *,
        commit: Callable[[], None],
    ) -> None:
        self.interval = interval
        self.load, self.store, self.commit = load, store, commit
        self.records: dict[int, ChainCheckpoint] = {}
        self.spec: Any = None
        self.pending = False  # kept records not stored yet
        self.written = -float("inf")

    def keep(self, records: dict[int, ChainCheckpoint], spec: Any) -> bool:
        """Keep the chains' newest ``records``; whether ``interval`` has passed since the last write."""
        if not self.records:  # storage this collector continues: its other chains' checkpoints stay
            self.records = dict(self.load()[0])
        self.records.update(records)
        self.spec, self.pending = spec, True
        return time.monotonic() - self.written >= self.interval

    def write(self) -> None:
        """If records are pending: commit the samples, then store the records (replacing what was
        stored)."""
        if not self.pending:
            return
        self.commit()  # a checkpoint never counts samples that are not stored
        self.store(self.records, self.spec)
        self.pending = False
        self.written = time.monotonic()


def write_store_key(location: Any, key: str, records: dict[int, ChainCheckpoint], spec: Any) -> None:
    """Replace key ``key`` of a Zarr store with ``records`` (one put)."""
    from jaxsave._store.zarr import store as _zarr_store

    buffer = io.BytesIO()
    write_file(buffer, records, spec)
    _zarr_store.set_bytes(location, key, buffer.getvalue())


def read_store(source: Any, storage_options: dict | None = None) -> tuple[dict[int, ChainCheckpoint], Any]:
    """Every writer's checkpoints in a Zarr store, merged (each writer's chains are its own)."""
    from jaxsave._store.zarr import store as _zarr_store
    from jaxsave._store.zarr.arrays import CHECKPOINT_PREFIX

    _, location = _zarr_store.open_group(source, "r", storage_options)
    records: dict[int, ChainCheckpoint] = {}
    spec = None
    for key in _zarr_store.list_keys(location, CHECKPOINT_PREFIX):
        if not key[len(CHECKPOINT_PREFIX) :].isdigit():
            continue  # not a checkpoint: the temporary of a put that a kill interrupted
        found, found_spec = read_store_key(location, key)
        if spec is not None and found:
            check_same_spec(spec, found_spec, f"the checkpoints in {key!r}")
        records.update(found)
        spec = found_spec if spec is None else spec
    return records, spec


def at_one_step(steps: dict[int, int], what: str) -> None:
    """Refuse chains ``{chain: step}`` that are not all at one step, naming the steps."""
    by_step: dict[int, list[int]] = {}
    for chain, step in sorted(steps.items()):
        by_step.setdefault(int(step), []).append(chain)
    if len(by_step) > 1:
        where = ", ".join(f"chain(s) {ids} at step {step}" for step, ids in sorted(by_step.items()))
        raise SaverStateError(
            f"{what} holds chains at different steps ({where}), which cannot continue as one "
            "stack of chains from one start; chains that were run separately resume separately: "
            "resume(source, chains=[...]) for each set of chains at one step"
        )


def select_chains(stored: dict[int, ChainCheckpoint], chains: Any) -> dict[int, ChainCheckpoint]:
    """The records of ``chains`` (chain ids); refuses ids that are not ints or have no record."""
    if chains is None:
        return stored
    ids = list(chains) if isinstance(chains, (list, tuple, range, np.ndarray)) else [chains]
    if not ids or any(isinstance(c, (bool, np.bool_)) or not isinstance(c, (int, np.integer)) for c in ids):
        raise TypeError(f"chains must be a chain id or a non-empty sequence of chain ids, got {chains!r}")
    missing = sorted({int(c) for c in ids} - set(stored))
    if missing:
        raise JaxsaveError(f"no checkpoint of chain(s) {missing}; there are checkpoints of {sorted(stored)}")
    return {int(c): stored[int(c)] for c in sorted({int(c) for c in ids})}


def resume(
    source: Any, like: Any = None, *, chains: Any = None, storage_options: dict | None = None
) -> Checkpoint:
    """The last complete checkpoint stored by a collector (or at a path).

    Args:
      source: a collector that a saver with ``checkpoint_every`` wrote to, the
        path of its samples file (``run.h5``; the checkpoint is ``run.h5.ckpt``), or
        a Zarr store (a directory, a URL, a store object: the checkpoints are in it).
      like: optional template of one chain, ``(solver_state, scheduler_state)``; a
        mismatch in structure, shape or dtype is an error naming the leaf. Needed
        when the state's classes are not registered in this process.
      chains: only these chain ids (default: every chain with a checkpoint).
      storage_options: fsspec options for a Zarr store named by URL (credentials,
        ``endpoint_url``...); a ``TypeError`` with a collector (it has its own) or an HDF5 path.

    The chains returned are all at one step (the chains of one ``init``, sharded
    or not, are always stored at one step); chains at different steps, which were
    run separately, are refused with an error naming the steps: resume them with
    ``chains=``, one set at a time.

    Continue with ``saver.init(init_sample, init_checkpoint, static_information,
    resume=checkpoint)`` on a saver over the same collector (or file).
    """
    from jaxsave.collectors import DataCollector, drain_writer

    if isinstance(source, DataCollector):
        if storage_options is not None:
            raise TypeError("storage_options= are for a store named by URL; a collector has its own")
        drain_writer(source)  # what the sampler already sent is stored first
        stored, spec = source.resume()
    elif is_zarr(source):
        check_storage_options(source, storage_options)
        stored, spec = read_store(source, storage_options)
    else:
        check_storage_options(source, storage_options)
        path = os.fspath(source)
        path = path if path.endswith(CHECKPOINT_SUFFIX) else path + CHECKPOINT_SUFFIX
        if not os.path.exists(path):
            raise JaxsaveError(f"no checkpoint file {path}: the run wrote no checkpoint (checkpoint_every?)")
        stored, spec = read_file(path)
    if not stored:
        raise JaxsaveError("no checkpoint has been written yet")
    stored = select_chains(stored, chains)
    at_one_step({c: r.step for c, r in stored.items()}, "the checkpoint")
    return assemble(stored, spec, like)
