"""One view over many sample files: the chains of several processes as one ``posterior``.

With ``jax.distributed``, each process writes its own chains to its own file
(``run-0.h5``, ``run-1.h5``, ...). :func:`merge` writes a small HDF5 file whose
``posterior/`` (and ``sample_stats/``) variables are *virtual datasets* over
those files: no sample is copied, and every reader (h5py, xarray, ArviZ,
:func:`jaxsave.load_samples`) sees ``(chain, draw, ...)`` arrays with a global
chain index, the chains of the first file first.

The sources are named by paths relative to the merged file, so a directory that
holds all of them can be moved or copied as a whole.

``jaxsave.merge`` (the package attribute) is the function :func:`merge`; this module is
``sys.modules["jaxsave.merge"]``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import NamedTuple

import h5py
import numpy as np

from jaxsave._core import atomic as _atomic
from jaxsave._core import filelock as _filelock
from jaxsave._core import paths as _paths
from jaxsave._store import schema
from jaxsave._store.hdf5 import sample_file
from jaxsave._store.schema import VariableInfo
from jaxsave.errors import FileFormatError, FileInUseError, StructureMismatchError

__all__ = ["merge"]

PathLike = str | os.PathLike


class _Source(NamedTuple):
    path: str
    counts: np.ndarray
    structure: str
    variables: list[VariableInfo]
    shapes: dict[str, tuple[int, ...]]  # "group/name" -> stored dataset shape
    dtypes: dict[str, np.dtype]
    attrs: dict[str, dict]


def _read_source(path: str) -> _Source:
    if not os.path.exists(path):
        raise FileFormatError(f"cannot merge {path!r}: no such file")
    try:
        _filelock.check_unlocked(path)
    except FileInUseError as error:
        raise FileInUseError(
            f"cannot merge {path!r}: a collector is still writing it; finish it first "
            "(postprocess, or collector.close())"
        ) from error
    with sample_file.open_sample_file(path) as f:
        if sample_file.read_layout(f) != schema.POSTERIOR:
            raise FileFormatError(f"cannot merge {path!r}: only files with layout='posterior' can be merged")
        if schema.STRUCTURE not in f.attrs:
            raise FileFormatError(f"cannot merge {path!r}: it holds no chains")
        variables, counts = sample_file.read_variables(f), sample_file.read_counts(f)
        lead = schema.counted_lead(counts)
        shapes, dtypes, attrs = {}, {}, {}
        for var in variables:
            ds = sample_file.leaf_dataset(f, schema.POSTERIOR, var)
            if ds.is_virtual:
                raise FileFormatError(f"cannot merge {path!r}: it is itself a merged file; merge its sources")
            row, dtype = schema.stored_row(var)
            if ds.dtype != dtype or not schema.fits(ds.shape, lead, row):
                raise FileFormatError(
                    f"{path!r}: dataset {ds.name} is {ds.shape} of {ds.dtype}; its structure and the "
                    f"sample counts {counts.tolist()[:8]} need at least "
                    f"{lead + row} of {dtype}"
                )
            key = schema.posterior_dataset(var.group, var.name)
            shapes[key], dtypes[key] = ds.shape, ds.dtype
            attrs[key] = {k: ds.attrs[k] for k in schema.LEAF_ATTRIBUTES if k in ds.attrs}
        return _Source(path, counts, sample_file.read_structure(f), variables, shapes, dtypes, attrs)


def _check_same(first: _Source, other: _Source) -> None:
    problems = []
    mine = {schema.posterior_dataset(v.group, v.name): v for v in first.variables}
    theirs = {schema.posterior_dataset(v.group, v.name): v for v in other.variables}
    problems += [f"{other.path!r} lacks variable {k!r}" for k in mine if k not in theirs]
    problems += [
        f"{other.path!r} has variable {k!r}, which {first.path!r} lacks" for k in theirs if k not in mine
    ]
    for k in mine.keys() & theirs.keys():
        a, b = mine[k], theirs[k]
        if (a.dtype, a.shape, a.key) != (b.dtype, b.shape, b.key) or first.dtypes[k] != other.dtypes[k]:
            problems.append(
                f"variable {k!r}: {first.path!r} has shape {a.shape} dtype {a.dtype}, "
                f"{other.path!r} has shape {b.shape} dtype {b.dtype}"
            )
    if problems:
        raise StructureMismatchError("the files cannot be merged:\n  " + "\n  ".join(sorted(problems)))


def merge(paths: Sequence[PathLike], out_path: PathLike) -> str:
    """Write ``out_path``: one sample file whose chains are those of ``paths``, in order.

    Every ``posterior/`` and ``sample_stats/`` variable of ``out_path`` is an
    HDF5 virtual dataset over the same variable of the sources, shaped
    ``(total chains, longest chain, ...)``; draws past a chain's count read as
    NaN (0 for integers), and the root attribute ``sample_counts`` holds every
    chain's count. The sources must be finished files
    (:class:`jaxsave.HDF5Collector` closed; :func:`jaxsave.recover` those of a
    killed process) with the same variables, shapes and dtypes. The root
    attributes ``jaxsave_merged_from`` (source paths, relative to ``out_path``)
    and ``jaxsave_chain_offsets`` (the first global chain of each source) say
    where each chain lives. An existing ``out_path`` is replaced only if it is a
    merged file (``FileExistsError`` for any other file); one a collector writes,
    or a source one writes, is a :class:`jaxsave.FileInUseError`. Returns ``out_path``.

    >>> import os, tempfile, jax.numpy as jnp, jaxsave
    >>> d = tempfile.mkdtemp()
    >>> for i in range(2):  # e.g. one file per process
    ...     init, save, post = jaxsave.save(jaxsave.HDF5Collector(os.path.join(d, f"run-{i}.h5")))
    ...     state, _ = save(init({"x": jnp.zeros(2)}), True, {"x": jnp.full(2, i, jnp.float32)})
    ...     _ = post(state, None)
    >>> sources = [os.path.join(d, "run-0.h5"), os.path.join(d, "run-1.h5")]
    >>> out = jaxsave.merge(sources, os.path.join(d, "all.h5"))
    >>> jaxsave.load_samples(out)["x"].tolist()
    [[[0.0, 0.0]], [[1.0, 1.0]]]
    """
    out_path = os.fspath(out_path)
    files: list[str] = [os.fspath(p) for p in paths]
    if not files:
        raise ValueError("merge needs at least one source file")
    if any(_paths.same_file(p, out_path) for p in files):
        raise ValueError(f"the merged file {out_path!r} cannot also be a source")
    for i, p in enumerate(files):
        twin = next((q for q in files[:i] if _paths.same_file(p, q)), None)
        if twin is not None:
            raise ValueError(f"merge got the same source twice: {twin!r} and {p!r}")
    _paths.check_directory(out_path)
    try:
        lock = _filelock.acquire(out_path)  # a collector's file is not replaced under it
    except FileInUseError as error:
        raise FileInUseError(
            f"cannot merge into {out_path!r}: a collector is writing it; merge into another path"
        ) from error
    try:
        _check_replaceable(out_path)
        return _write(files, out_path)
    finally:
        lock.release()


def _check_replaceable(out_path: str) -> None:
    """An existing ``out_path`` is replaced only if it is a merged file (a merge made again)."""
    if not os.path.lexists(out_path):
        return
    try:
        with sample_file.open_sample_file(out_path) as f:
            merged = schema.MERGED_FROM in f.attrs
    except (FileFormatError, OSError):
        merged = False
    if not merged:
        raise FileExistsError(
            f"merge would replace {out_path!r}, which is not a merged file (its samples would be "
            "lost): remove it first, or merge into another path"
        )


def _source_names(paths: list[str], out_path: str) -> list[str]:
    """Each source's path relative to the merged file's real directory (where HDF5 looks for
    it: through a symbolic link, ``..`` is the link target's parent), each checked to name
    the source."""
    here = os.path.realpath(_paths.directory_of(out_path))
    names = [os.path.relpath(os.path.realpath(p), here) for p in paths]
    for path, name in zip(paths, names):
        if "%" in name:
            raise ValueError(
                f"merge cannot name the source {path!r}: HDF5 reads a '%' in a source's name as a "
                "pattern; rename the file"
            )
        if not _paths.same_file(os.path.join(here, name), path):
            raise ValueError(f"the source {path!r} cannot be found from the merged file's directory {here!r}")
    return names


def _write(paths: list[str], out_path: str) -> str:
    sources = [_read_source(p) for p in paths]
    for other in sources[1:]:
        _check_same(sources[0], other)
    counts = np.concatenate([s.counts for s in sources]).astype(np.int64)
    offsets = np.cumsum([0] + [len(s.counts) for s in sources])
    draws = int(counts.max()) if counts.size else 0  # type: ignore[call-overload]
    names = _source_names(paths, out_path)
    first = sources[0]
    with _atomic.atomic_path(out_path) as tmp, h5py.File(tmp, "w", libver=("v110", "latest")) as f:
        sample_file.write_root_attributes(f.attrs, schema.POSTERIOR)
        f.attrs[schema.STRUCTURE] = first.structure
        f.attrs[schema.COUNTS] = counts
        f.attrs[schema.MERGED_FROM] = json.dumps(names)
        f.attrs[schema.CHAIN_OFFSETS] = offsets[:-1].astype(np.int64)
        for group_name in dict.fromkeys(v.group for v in first.variables):
            sample_file.create_scales(f.create_group(group_name), len(counts), draws)
        for var in first.variables:
            _virtual_variable(f, var, sources, names, offsets, draws)
    return out_path


def _virtual_variable(
    f: h5py.File, var: VariableInfo, sources: list[_Source], names: list[str], offsets: np.ndarray, draws: int
) -> None:
    key = schema.posterior_dataset(var.group, var.name)
    tail, dtype = sources[0].shapes[key][2:], sources[0].dtypes[key]
    layout = h5py.VirtualLayout(shape=(int(offsets[-1]), draws) + tail, dtype=dtype)
    for source, name, start in zip(sources, names, offsets[:-1].tolist()):
        chains = len(source.counts)
        n = int(source.counts.max()) if chains else 0
        if not chains or not n:
            continue
        vsource = h5py.VirtualSource(name, key, shape=source.shapes[key])
        layout[start : start + chains, :n] = vsource[:chains, :n]
    group = f[var.group]
    ds = group.create_virtual_dataset(var.name, layout, fillvalue=schema.stored_fill_value(dtype))
    for k, v in sources[0].attrs[key].items():
        ds.attrs[k] = v
    sample_file.attach_scales(group, ds, var.name)
