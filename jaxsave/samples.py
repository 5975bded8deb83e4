"""Reading sample files written by :class:`jaxsave.HDF5Collector` and Zarr stores written by
:class:`jaxsave.ZarrCollector`.

Every reader takes an HDF5 file's path or a Zarr store (a directory, a URL such as
``memory://run`` or ``s3://bucket/run.zarr``, a zarr store object); which one it is, is
decided once, by :func:`jaxsave._store.source.open_source`.

* :func:`load_samples` returns the samples as the original pytree, for one chain
  ``(draw, ...)`` or all ``(chain, draw, ...)``, reading only the draws asked for.
* :func:`open_live` follows a file while the sampler still writes it (SWMR).
* :func:`to_inference_data` makes what the installed ArviZ works with
  (``xarray.DataTree`` on ArviZ 1.x, ``arviz.InferenceData`` on 0.x).
* :func:`file_info` describes a file; :func:`recover` makes the file of a killed
  writer readable by every HDF5 reader again.

Only rows counted in the file's ``sample_counts`` are ever returned. Every
problem with the file itself raises :class:`jaxsave.FileFormatError`.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from jaxsave._core import dtypes as _dtypes
from jaxsave._core import filelock as _filelock
from jaxsave._core.tree import dict_to_pytree, pytree_dict_keys
from jaxsave._serialize.treespec import decode_structure
from jaxsave._store import arviz as _arviz
from jaxsave._store import schema
from jaxsave._store.arguments import check_sample_stats
from jaxsave._store.hdf5 import superblock as _superblock
from jaxsave._store.hdf5.sample_file import open_sample_file
from jaxsave._store.location import check_storage_options, is_zarr
from jaxsave._store.names import variable_entries
from jaxsave._store.rows import read_leaves
from jaxsave._store.schema import VariableInfo
from jaxsave._store.source import SampleSource, open_source
from jaxsave.errors import StructureMismatchError, UnregisteredNameError

__all__ = [
    "load_samples",
    "open_live",
    "LiveSamples",
    "to_inference_data",
    "file_info",
    "SampleFileInfo",
    "VariableInfo",
    "recover",
]

PathLike = str | os.PathLike


class SampleFileInfo(NamedTuple):
    """What :func:`file_info` finds in a jaxsave sample file."""

    path: str
    format: int
    version: str
    layout: str
    created: str
    sample_counts: np.ndarray
    variables: list[VariableInfo]
    open_for_writing: bool

    @property
    def chains(self) -> int:
        return len(self.sample_counts)


def _info(f: SampleSource) -> SampleFileInfo:
    info = f.info()
    return SampleFileInfo(
        path=f.path,
        format=info["format"],
        version=info["version"],
        layout=f.layout(),
        created=info["created"],
        sample_counts=f.counts(),
        variables=f.variables() if f.has_structure() else [],
        open_for_writing=info["open_for_writing"],
    )


def file_info(path: PathLike, *, storage_options: dict | None = None) -> SampleFileInfo:
    """Format, layout, per-chain sample counts and variables of a sample file.

    ``storage_options``: fsspec options for a Zarr store named by URL (as in
    :func:`load_samples`).

    >>> import tempfile, os, jax.numpy as jnp, jaxsave
    >>> path = os.path.join(tempfile.mkdtemp(), "s.h5")
    >>> init, save, post = jaxsave.save(jaxsave.HDF5Collector(path))
    >>> _ = post(save(init({"w": jnp.zeros(2)}), True, {"w": jnp.ones(2)})[0], None)
    >>> info = jaxsave.file_info(path)
    >>> info.chains, info.sample_counts.tolist(), [(v.name, v.shape, v.dtype) for v in info.variables]
    (1, [1], [('w', (2,), 'float32')])
    """
    with open_source(path, storage_options) as f:
        return _info(f)


def _nest(keys: Sequence[tuple[str, ...]], leaves: Sequence[Any], lists: bool = True) -> Any:
    """Nested dicts from key paths; with ``lists``, a dict keyed ``list_element_0..n-1`` becomes a list."""
    if len(keys) == 1 and keys[0] == ():
        return leaves[0]
    root: dict = {}
    for key, leaf in zip(keys, leaves):
        node = root
        for part in key[:-1]:
            node = node.setdefault(part, {})
        node[key[-1]] = leaf

    def listify(node: Any) -> Any:
        if not isinstance(node, dict):
            return node
        node = {k: listify(v) for k, v in node.items()}
        names = [f"list_element_{i}" for i in range(len(node))]
        return [node[n] for n in names] if node and set(node) == set(names) else node

    return listify(root) if lists else root


def _template_specs(like: Any) -> dict[tuple[str, ...], _dtypes.LeafSpec]:
    return {k: _dtypes.leaf_spec(x) for k, x in zip(pytree_dict_keys(like), jax.tree.leaves(like))}


def _check_like(variables: list[VariableInfo], like: Any) -> None:
    want = _template_specs(like)
    have = {v.key: _dtypes.LeafSpec(v.shape, v.dtype) for v in variables}
    problems = [f"the file has no leaf {'/'.join(k)!r}" for k in want if k not in have]
    problems += [f"the file's leaf {'/'.join(k)!r} is not in `like`" for k in have if k not in want]
    for k in want.keys() & have.keys():
        if want[k] != have[k]:
            problems.append(
                f"leaf {'/'.join(k)!r}: file has shape {have[k].shape} dtype {have[k].dtype}, "
                f"`like` has shape {want[k].shape} dtype {want[k].dtype}"
            )
    if problems:
        raise StructureMismatchError("the file does not match `like`:\n  " + "\n  ".join(problems))


def _load(f: SampleSource, chain: int | None, like: Any, draws: slice) -> Any:
    layout = f.layout()
    variables, counts = f.variables(), f.counts()
    if like is not None:
        _check_like(variables, like)
    if chain is not None and not 0 <= chain < len(counts):
        raise IndexError(f"chain {chain} is not in the file, which has {len(counts)} chains")
    chains = list(range(len(counts))) if chain is None else [int(chain)]
    leaves = [
        _dtypes.from_storable(stored[0] if chain is not None else stored, var.dtype)
        for var, stored in zip(variables, read_leaves(f, layout, variables, chains, counts, draws))
    ]
    keys = [v.key for v in variables]
    if like is None:
        return _rebuild(f, keys, leaves)
    return dict_to_pytree(_nest(keys, leaves, lists=False), like)


def _rebuild(f: SampleSource, keys: list[tuple[str, ...]], leaves: list[Any]) -> Any:
    """The stored tree structure around ``leaves``; nested dicts if its classes are unknown here."""
    spec = json.loads(f.structure()).get("treespec")
    if spec is not None:
        try:
            return decode_structure(spec, leaves, leaf_fn=lambda kind, leaf: leaf)
        except UnregisteredNameError as error:
            warnings.warn(f"returning nested dicts: {error} (or pass like=)", stacklevel=3)
    return _nest(keys, leaves)


def load_samples(
    path: PathLike,
    chain: int | None = None,
    like: Any = None,
    *,
    draws: slice | None = None,
    storage_options: dict | None = None,
) -> Any:
    """The samples in ``path`` as a pytree: ``(draw, ...)`` leaves for one chain,
    ``(chain, draw, ...)`` for all.

    Args:
      path: a file written by :class:`jaxsave.HDF5Collector` (either layout), or a
        store written by :class:`jaxsave.ZarrCollector`.
      chain: one chain's index, or ``None`` for all chains (shorter chains are
        padded with NaN, or 0 for non-float leaves, up to the longest). Padding
        beyond 64 times the draws read (and 64 MiB) raises
        :class:`jaxsave.ReadTooLargeError`: read such chains one at a time.
      like: a template of one sample (arrays or ``jax.ShapeDtypeStruct``); the
        result then has its exact tree structure, and a file whose leaves,
        shapes or dtypes differ raises :class:`jaxsave.StructureMismatchError`.
        Without it, the stored structure is rebuilt (namedtuples, dataclasses,
        ... whose classes are in :mod:`jaxsave.registry`; types defined by the
        process that wrote the file are registered there); if a class is
        unknown, you get nested dicts (lists for ``list_element_i`` keys) and a
        warning.
      draws: a slice of the draws to read; only those are read from disk.
      storage_options: fsspec options (credentials, ``endpoint_url``...) for a Zarr
        store named by URL (``s3://...``), handed to zarr's store; with an HDF5 file,
        a ``TypeError``.

    Typed PRNG keys come back as key arrays, ml_dtypes as their own dtypes.

    >>> import tempfile, os, jax, jax.numpy as jnp, jaxsave
    >>> path = os.path.join(tempfile.mkdtemp(), "s.h5")
    >>> init, save, post = jaxsave.save(jaxsave.HDF5Collector(path))
    >>> state = init({"w": [jnp.zeros((2, 2))]}, None, chains=2)
    >>> run = lambda s: jax.lax.scan(lambda s, i: save(s, True, {"w": [jnp.full(2, i, jnp.float32)]}), s,
    ...                              jnp.arange(6))[0]
    >>> _ = post(jax.vmap(run)(state), None)
    >>> jaxsave.load_samples(path)["w"][0].shape
    (2, 6, 2)
    >>> jaxsave.load_samples(path, chain=1, draws=slice(4, None))["w"][0][:, 0].tolist()
    [4.0, 5.0]
    """
    draws = slice(None) if draws is None else draws
    if not isinstance(draws, slice):
        raise TypeError(f"draws must be a slice, got {type(draws).__name__}")
    if draws.step == 0:
        raise ValueError("draws: a slice step cannot be zero")
    with open_source(path, storage_options) as f:
        return _load(f, chain, like, draws)


class LiveSamples:
    """A sample file that a running sampler is still writing; see :func:`open_live`."""

    def __init__(self, path: PathLike, like: Any = None, *, storage_options: dict | None = None):
        self.path = path if is_zarr(path) and not isinstance(path, (str, os.PathLike)) else os.fspath(path)
        self.like, self.storage_options = like, storage_options
        self.sample_counts = np.zeros(0, np.int64)
        with open_source(self.path, storage_options):
            pass

    def refresh(self, chain: int | None = None, draws: slice | None = None) -> Any:
        """Re-read the file: the samples written so far (as :func:`load_samples` returns them).

        Also updates :attr:`sample_counts`.
        """
        with open_source(self.path, self.storage_options) as f:
            self.sample_counts = f.counts()
            return _load(f, chain, self.like, slice(None) if draws is None else draws)

    # No file stays open between refreshes (each one reopens it), so there is nothing to
    # release: ``with open_live(...) as live:`` is accepted, and leaving it closes nothing.
    def __enter__(self) -> LiveSamples:
        """``self``: a ``with`` block holds no file open (each :meth:`refresh` opens its own)."""
        return self

    def __exit__(self, *exc: Any) -> None:
        """Nothing to release: no file stays open between refreshes."""

    def __repr__(self) -> str:
        return f"LiveSamples({self.path!r}, sample_counts={self.sample_counts.tolist()})"


def open_live(path: PathLike, like: Any = None, *, storage_options: dict | None = None) -> LiveSamples:
    """Follow a sample file while it is written (``HDF5Collector(..., swmr=True)``, the default),
    or a Zarr store (``storage_options``: fsspec's, for a store named by URL).

    Each :meth:`LiveSamples.refresh` reopens the file in SWMR read mode and returns
    the draws written so far; it never holds the file open in between.

    >>> import tempfile, os, jax.numpy as jnp, jaxsave
    >>> path = os.path.join(tempfile.mkdtemp(), "s.h5")
    >>> init, save, post = jaxsave.save(jaxsave.HDF5Collector(path, flush_interval=0), block_size=2)
    >>> state = init({"w": jnp.zeros(())})
    >>> for i in range(3):
    ...     state, _ = save(state, True, {"w": jnp.float32(i)})
    >>> live = jaxsave.open_live(path)
    >>> import time; deadline = time.monotonic() + 60   # the writer thread stores the first block
    >>> while live.refresh()["w"].size < 2 and time.monotonic() < deadline:  # chain 0 exists then
    ...     time.sleep(0.01)
    >>> live.refresh(chain=0)["w"].tolist(), live.sample_counts.tolist()
    ([0.0, 1.0], [2])
    >>> _ = post(state, None)
    >>> live.refresh(chain=0)["w"].tolist()
    [0.0, 1.0, 2.0]
    """
    return LiveSamples(path, like, storage_options=storage_options)


def _result_arrays(result: dict, sample_stats: Any) -> tuple[dict, dict, np.ndarray]:
    samples, counts = result["samples"], np.asarray(result["sample_count"])
    keys, leaves = pytree_dict_keys(samples), jax.tree.leaves(samples)
    batch = counts.ndim
    groups: dict[str, dict] = {schema.POSTERIOR_GROUP: {}, schema.STATS_GROUP: {}}
    for (group, name), leaf in zip(variable_entries(keys, sample_stats), leaves):
        arr = np.asarray(jax.random.key_data(leaf)) if _dtypes.is_key(leaf) else np.asarray(leaf)
        groups[group][name] = arr[None] if batch == 0 else arr.reshape((-1,) + arr.shape[batch:])
    return groups[schema.POSTERIOR_GROUP], groups[schema.STATS_GROUP], counts.reshape(-1)


def _for_arviz(arr: np.ndarray, n: int) -> np.ndarray:
    arr = arr[:, :n]
    return arr.astype(np.float32) if arr.dtype.name in _dtypes.ML_DTYPES else arr


def to_inference_data(
    path_or_result: PathLike | dict, *, sample_stats: Any = None, storage_options: dict | None = None
) -> Any:
    """The samples as ArviZ data: groups ``posterior`` (and ``sample_stats``).

    Returns an ``xarray.DataTree`` on ArviZ 1.x and an ``arviz.InferenceData`` on
    ArviZ 0.x; both have dims ``chain``, ``draw`` and ``<var>_dim_<i>``, and both
    are indexed the same way (``data["posterior"]["x"]``).

    Takes a sample file, or the dict that ``postprocess`` returns (then
    ``sample_stats`` names the top-level keys, or is a key-path predicate, that
    go to ``sample_stats``). Chains are cut to the draws that all of them have;
    bfloat16/fp8 become float32 and PRNG keys their key data. ``storage_options``:
    fsspec options for a Zarr store named by URL (as in :func:`load_samples`).

    >>> import jax.numpy as jnp, jaxsave
    >>> samples = {"x": jnp.zeros((2, 3, 4)), "lp": jnp.zeros((2, 3))}
    >>> result = {"sample_count": jnp.array([3, 3]), "samples": samples}
    >>> idata = jaxsave.to_inference_data(result, sample_stats=("lp",))
    >>> dict(idata["posterior"]["x"].sizes), list(idata["sample_stats"].data_vars)
    ({'chain': 2, 'draw': 3, 'x_dim_0': 4}, ['lp'])
    """
    if isinstance(path_or_result, dict):
        if storage_options is not None:
            raise TypeError("storage_options= are for a store named by URL, not a postprocess result")
        check_sample_stats(sample_stats)
        posterior, stats, counts = _result_arrays(path_or_result, sample_stats)
    else:
        with open_source(path_or_result, storage_options) as f:
            layout = f.layout()
            variables, counts = f.variables(), f.counts()
            chains = list(range(len(counts)))
            posterior, stats = {}, {}
            arrays = read_leaves(f, layout, variables, chains, counts, slice(None)) if chains else []
            for var, arr in zip(variables, arrays):
                if var.dtype in _dtypes.ML_DTYPES:
                    arr = arr.view(_dtypes.dtype_from_name(var.dtype))
                (stats if var.group == "sample_stats" else posterior)[var.name] = arr
    n = int(counts.min()) if counts.size else 0
    if counts.size and n < int(counts.max()):
        warnings.warn(
            f"chains have different sample counts {counts.tolist()}; using the first {n} draws of each",
            stacklevel=2,
        )
    posterior = {k: _for_arviz(v, n) for k, v in posterior.items()}
    stats = {k: _for_arviz(v, n) for k, v in stats.items()}
    return _arviz.from_groups({"posterior": posterior, "sample_stats": stats})


def recover(path: PathLike, *, storage_options: dict | None = None) -> bool:
    """Make the file of a killed writer openable by every HDF5 reader (``h5clear -s --increment``),
    or the Zarr store of one by xarray (its leaf arrays cut to one length, the longest count).

    A file written in SWMR mode stays marked "open for writing" when its writer
    is killed; jaxsave's readers open it anyway, but xarray and plain h5py refuse.
    A file that a collector still writes is refused (:class:`jaxsave.FileInUseError`,
    naming the writer). A stored end-of-file address that lags behind the file (a
    kill between data and superblock writes) is moved past its end, as
    ``h5clear --increment`` does. Returns whether the mark (or such an address) was
    there. The samples counted in ``sample_counts`` are all readable after.
    ``storage_options``: fsspec options for a Zarr store named by URL (an HDF5 file
    takes none: a ``TypeError``).

    >>> import tempfile, os, jax.numpy as jnp, jaxsave
    >>> path = os.path.join(tempfile.mkdtemp(), "s.h5")
    >>> init, save, post = jaxsave.save(jaxsave.HDF5Collector(path))
    >>> _ = post(save(init(jnp.zeros(())), True, jnp.float32(1))[0], None)
    >>> jaxsave.recover(path)  # closed cleanly: nothing to do
    False
    """
    check_storage_options(path, storage_options)
    if is_zarr(path):  # every key is written whole; a writer killed while it resized leaves arrays
        from jaxsave._store.zarr.sample_store import align_shapes  # of different lengths

        if isinstance(path, (str, os.PathLike)) and os.path.isdir(path):
            _filelock.check_unlocked(path)
        return align_shapes(path, storage_options)
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file: {path!r}")
    _filelock.check_unlocked(path)
    changed = _superblock.clear_open_flags(path, eoa_margin=_superblock.EOA_MARGIN)
    with open_sample_file(path):
        pass
    return changed
