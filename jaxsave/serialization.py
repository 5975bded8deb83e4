"""Saving and loading pytrees and models, safely: no pickle, atomic, versioned, validated.

>>> import os, tempfile, jax, jax.numpy as jnp, jaxsave
>>> path = os.path.join(tempfile.mkdtemp(), "params.jaxsave")
>>> params = {"w": jnp.ones((2, 3)), "b": jnp.zeros(3), "act": jax.nn.relu}
>>> jaxsave.save_pytree(path, params, metadata={"step": 10})
>>> jaxsave.read_metadata(path)
{'step': 10}
>>> restored = jaxsave.load_pytree(path, like=params)
>>> bool((restored["w"] == params["w"]).all()), restored["act"] is jax.nn.relu
(True, True)
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import struct
import zipfile
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO, Union

import jax
import numpy as np

from jaxsave._core.atomic import atomic_path
from jaxsave._core.dtypes import (
    KEY_IMPLS,
    LeafSpec,
    dtype_from_name,
    from_storable,
    is_key_dtype_name,
    key_dtype_name,
    key_impl_of,
    leaf_spec,
)
from jaxsave._core.nogc import without_gc
from jaxsave._core.regular_file import open_regular
from jaxsave._core.transfer import device_put_many
from jaxsave._serialize import formats as _formats
from jaxsave._serialize import treematch as _treematch
from jaxsave._serialize import treespec as _treespec
from jaxsave._serialize import versions as _versions
from jaxsave._serialize.leaf_table import (
    KEY,
    as_view,
    leaf_columns,
    leaf_table_and_arrays,
    logical_view,
    read_leaf_table,
    unique_names,
)
from jaxsave._version import __version__
from jaxsave.errors import FileFormatError, JaxsaveError, StructureMismatchError

__all__ = [
    "save_pytree",
    "load_pytree",
    "read_metadata",
    "open_pytree",
    "PytreeFile",
    "register_format_upgrade",
    "FORMAT_VERSION",
]

#: Version of the pytree file layout (header fields, structure encoding) this jaxsave writes.
#: (The sample files of :mod:`jaxsave.hdf5` have their own, ``SAMPLE_FILE_FORMAT``.)
#: Version 2 stores the leaf table as columns (``{"names": [...], "dtypes": [...],
#: "shapes": [...]}``); version 1 had one ``{"name", "dtype", "shape"}`` object per leaf
#: and is upgraded on load (a built-in upgrade from version 1).
PYTREE_FILE_FORMAT = _versions.PYTREE_FILE_FORMAT
#: The public name of :data:`PYTREE_FILE_FORMAT`.
FORMAT_VERSION = PYTREE_FILE_FORMAT

File = Union[str, "os.PathLike[str]", BinaryIO]


def register_format_upgrade(from_version: int) -> Callable[[Callable], Callable]:
    """Register ``fn(header) -> header`` turning a format ``from_version`` header into the next.

    Loading a file of an older format applies the registered upgrades in turn;
    a missing step is a :class:`~jaxsave.errors.FileFormatError`. What an
    upgrade raises propagates as it is (with a note naming the upgrade).
    The upgrade from version 1 is built in (registering another replaces it).
    """

    def register(fn: Callable[[dict[str, Any]], dict[str, Any]]) -> Callable:
        _versions.UPGRADES[from_version] = fn
        return fn

    return register


def _check_file_object(file: Any, method: str) -> None:
    """Refuse a ``file`` that is neither a path nor a file object (one with ``method``)."""
    if not callable(getattr(file, method, None)):
        raise TypeError(
            f"file must be a path (a str or os.PathLike) or a binary file object, got {type(file).__name__}"
            f" {file!r}"[:200]
        )


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.generic, np.ndarray, jax.Array)) and np.ndim(o) <= 8:
        return np.asarray(o).tolist()
    raise TypeError(f"metadata values must be JSON-able, got {type(o).__name__}")


@without_gc
def save_pytree(
    file: File,
    tree: Any,
    *,
    metadata: Any = None,
    format: str | None = None,
    fsync: bool = True,
) -> None:
    """Save ``tree`` (arrays, Python scalars/strings/None, registered objects) to ``file``.

    ``file`` is a path or a binary file object. The format is ``format``
    (``"jaxsave"``, ``"safetensors"``, ``"npz"``, ``"hdf5"``) or follows the
    suffix (``.safetensors``, ``.npz``, ``.h5``; anything else: ``jaxsave``).
    A path is written atomically (temporary file, fsync, rename); ``fsync=False``
    skips the fsyncs. ``metadata`` is any JSON-able value (numpy/JAX scalars are
    converted), readable later with :func:`read_metadata` without the arrays.
    Non-array values that cannot be saved by name raise
    :class:`~jaxsave.errors.UnregisteredNameError` listing all of them.
    """
    if not isinstance(file, (str, os.PathLike)):
        _check_file_object(file, "write")
    fmt = _formats.format_for_path(file, format)
    if isinstance(file, (str, os.PathLike)) and os.path.isdir(file):
        raise IsADirectoryError(f"{os.fspath(file)!r} is a directory; save_pytree needs a file path")
    spec, leaves, names = _treespec.encode_structure_with_names(tree)
    table, arrays = leaf_table_and_arrays(unique_names(names), leaves)
    header = {
        "format": "jaxsave",
        "format_version": PYTREE_FILE_FORMAT,
        "jaxsave_version": __version__,
        "metadata": json.loads(json.dumps(metadata, default=_json_default)),
        "structure": spec,
        "leaves": table,
    }
    module = _formats.format_module(fmt)
    if isinstance(file, (str, os.PathLike)):
        with atomic_path(file, fsync=fsync) as tmp:
            module.write(tmp, header, arrays)
    else:
        module.write(file, header, arrays)


@without_gc
def load_pytree(
    file: File,
    like: Any = None,
    *,
    partial: bool = False,
    as_numpy: bool = False,
    format: str | None = None,
) -> Any:
    """Load a tree saved by :func:`save_pytree` (or a plain ``.npz``/``.safetensors``).

    Without ``like``, classes and named objects are resolved through
    :mod:`jaxsave.registry`, and array leaves come back as the type they were
    saved as (``jax.Array``, ``np.ndarray`` or numpy scalar). With ``like`` (a
    pytree of arrays or ``jax.ShapeDtypeStruct``\\ s), the file must match it in
    structure, keys, static fields, shapes and dtypes, or a
    :class:`~jaxsave.errors.StructureMismatchError` lists every difference by
    path; leaves take ``like``'s types (and ``sharding``). ``partial=True`` loads
    only the dict entries present in ``like`` (the rest is not even read).
    ``as_numpy=True`` returns numpy arrays instead of ``jax.Array``\\ s.
    """
    with open_pytree(file, format=format) as f:
        return f.load(like, partial=partial, as_numpy=as_numpy)


def read_metadata(file: File, *, format: str | None = None) -> Any:
    """The metadata saved with a tree, read without loading any array."""
    with open_pytree(file, format=format) as f:
        return f.metadata


def open_pytree(file: File, *, format: str | None = None) -> PytreeFile:
    """Open a saved tree for lazy access (use as a context manager).

    >>> import io, numpy as np, jaxsave
    >>> buf = io.BytesIO()
    >>> jaxsave.save_pytree(buf, {"a": np.arange(3), "b": [np.ones(2)]})
    >>> _ = buf.seek(0)
    >>> with jaxsave.open_pytree(buf) as f:
    ...     print(f.specs)
    ...     print(f["a"])
    {'a': LeafSpec(shape=(3,), dtype='int64'), 'b.list_element_0': LeafSpec(shape=(2,), dtype='float64')}
    [0 1 2]
    """
    return PytreeFile(file, format=format)


@functools.cache
def _key_dtype_names() -> dict[str, str]:
    return {str(jax.random.key(0, impl=impl).dtype): impl for impl in KEY_IMPLS}


def _target_spec(x: Any) -> LeafSpec:
    if isinstance(x, jax.ShapeDtypeStruct) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return LeafSpec(tuple(x.shape), key_dtype_name(_key_dtype_names().get(str(x.dtype), str(x.dtype))))
    return leaf_spec(x)


#: What the file readers (zipfile, numpy, h5py, safetensors) raise on damaged bytes.
_DAMAGE = (
    zipfile.BadZipFile,
    NotImplementedError,
    EOFError,
    struct.error,
    UnicodeDecodeError,
    ValueError,
    KeyError,
    IndexError,
    TypeError,
    RuntimeError,
    OverflowError,
    RecursionError,
)


@contextlib.contextmanager
def _damage_is_a_format_error(file: Any) -> Iterator[None]:
    """Turn what a reader raises on a damaged file into a :class:`FileFormatError` naming the file.

    Errors of the file system itself (missing file, no permission...) pass as they are.
    Only jaxsave's own reading runs inside: user code (format upgrades) does not.
    """
    try:
        yield
    except JaxsaveError:
        raise
    except _DAMAGE as error:
        raise FileFormatError(
            f"{_describe(file)} is damaged or not a valid file of its format: {type(error).__name__}: {error}"
        ) from error
    except OSError as error:
        if type(error) is not OSError or error.errno not in (None, 22):  # EINVAL: a seek to a bad offset
            raise
        raise FileFormatError(
            f"{_describe(file)} is damaged or not a valid file of its format: {error}"
        ) from error


def _describe(file: Any) -> str:
    return repr(os.fspath(file)) if isinstance(file, (str, os.PathLike)) else "the file"


class PytreeFile:
    """A saved tree, opened: metadata and leaf specs at once, arrays on demand."""

    @without_gc
    def __init__(self, file: File, *, format: str | None = None):
        if isinstance(file, (str, os.PathLike)):
            with open_regular(file) as f:  # a FIFO would block the open
                head = f.read(16)
        else:
            _check_file_object(file, "readable")
            if not (file.readable() and file.seekable()):
                raise ValueError("file objects must be readable and seekable")
            pos = file.tell()
            head = file.read(16)
            file.seek(pos)
        self.format = _formats.sniff(head, file, format)
        self._file = file
        with _damage_is_a_format_error(file):
            self._reader = _formats.format_module(self.format).Reader(file)
        try:
            with _damage_is_a_format_error(file):
                header = self._reader.header
                if header is None:
                    header = self._foreign_header()
            header = _versions.upgrade(header)  # outside: what a registered upgrade raises is not damage
            with _damage_is_a_format_error(file):
                self._init_header(header)
                self._reader.check_arrays(self._storage, self._names)
        except BaseException:
            self._reader.close()
            raise

    def _foreign_header(self) -> dict[str, Any]:
        """A header for a plain .npz/.safetensors written by another tool: a flat dict."""
        specs = self._reader.foreign_specs()  # type: ignore[attr-defined]
        names = [n for n, _, _ in specs]
        spec, _ = _treespec.encode_structure({n: np.empty(0) for n in names})
        return {
            "format_version": PYTREE_FILE_FORMAT,
            "jaxsave_version": None,
            "metadata": None,
            "structure": spec,
            "leaves": leaf_columns(names, [d for _, _, d in specs], [list(s) for _, s, _ in specs]),
        }

    def _init_header(self, header: dict[str, Any]) -> None:
        table = read_leaf_table(header.get("leaves"))
        self._shapes: list[tuple[int, ...]] = table.shapes
        self._dtypes = table.dtypes
        self._specs_cache: list[LeafSpec] | None = None
        self._names: list[str] = table.names
        self._storage: list[tuple[tuple[int, ...], str]] = table.storage
        self._index = dict(zip(table.names, range(len(table.names))))
        if len(self._index) != len(table.names):
            raise FileFormatError("two leaves of the header have the same name")
        self._structure = header.get("structure")
        self._kinds_cache: list[str] | None = None
        self.metadata: Any = header.get("metadata")
        self.format_version: int = header["format_version"]
        self.jaxsave_version: str | None = header.get("jaxsave_version")

    @property
    def _specs(self) -> list[LeafSpec]:
        if self._specs_cache is None:
            self._specs_cache = list(map(LeafSpec, self._shapes, self._dtypes))
        return self._specs_cache

    @property
    def _kinds(self) -> list[str]:
        if self._kinds_cache is None:
            kinds = _array_kinds(self._structure)
            if len(kinds) != len(self._dtypes):
                raise FileFormatError(
                    f"the structure has {len(kinds)} array leaves, the leaf table {len(self._dtypes)}"
                )
            self._kinds_cache = kinds
        return self._kinds_cache

    @property
    def specs(self) -> dict[str, LeafSpec]:
        """Name, shape and dtype of every array leaf, in order; no data is read."""
        return dict(zip(self._names, self._specs))

    def keys(self) -> list[str]:
        """The names of the array leaves (readable key paths, e.g. ``params.dense.kernel``)."""
        return list(self._names)

    def __getitem__(self, name: str) -> Any:
        """Read one array leaf by name (only its bytes are read)."""
        if name not in self._index:
            raise KeyError(f"no leaf {name!r}; leaves: {self._names[:10]}...")
        i = self._index[name]
        return self._convert(self._read([i]), [i], [self._kinds[i]], [None], False)[0]

    def shape_dtype_tree(self) -> Any:
        """The tree with a ``jax.ShapeDtypeStruct`` per array leaf (usable as ``like=``)."""
        sds = [jax.ShapeDtypeStruct(s.shape, _sds_dtype(s.dtype)) for s in self._specs]
        return _treespec.decode_structure(self._structure, sds)

    @without_gc
    def load(self, like: Any = None, *, partial: bool = False, as_numpy: bool = False) -> Any:
        """Load the whole tree (see :func:`load_pytree`)."""
        if like is None:
            if partial:
                raise ValueError("partial=True needs like= to say which part to load")
            idx = list(range(len(self._dtypes)))
            leaves = self._convert(self._read(idx), idx, self._kinds, [None] * len(idx), as_numpy)
            return _treespec.decode_structure(self._structure, leaves)
        like_spec, like_arrays = _treespec.encode_structure(like, strict=False)
        plan, problems = _treematch.match_structure(
            self._structure,  # type: ignore[arg-type]
            like_spec,
            self._specs,
            [_target_spec(x) for x in like_arrays],
            partial=partial,
        )
        if problems:
            listed = "\n".join(f"  - {p}" for p in problems)
            raise StructureMismatchError(
                f"the file does not match the target tree ({len(problems)} difference(s)):\n{listed}"
            )
        like_leaves, treedef = jax.tree.flatten(like)
        want = [
            (pos, entry[1], leaf)
            for pos, (entry, leaf) in enumerate(zip(plan, like_leaves))
            if entry is not None and entry[0] == "array"
        ]
        idx = [fi for _, fi, _ in want]
        kinds = [_treespec.array_kind(leaf) for _, _, leaf in want]
        arrays = self._convert(self._read(idx), idx, kinds, [leaf for _, _, leaf in want], as_numpy)
        out = list(like_leaves)
        for (pos, _, _), arr in zip(want, arrays):
            out[pos] = arr
        for pos, entry in enumerate(plan):
            if entry is not None and entry[0] == "value":
                out[pos] = _treematch.decode_plain_value(entry[1])
        return jax.tree.unflatten(treedef, out)

    def _read(self, idx: list[int]) -> list[np.ndarray]:
        with _damage_is_a_format_error(self._file):
            return self._reader.read(idx, self._storage, self._names) if idx else []

    def _convert(
        self, arrays: list[np.ndarray], idx: list[int], kinds: list[str], targets: list[Any], as_numpy: bool
    ) -> list[Any]:
        """The stored arrays as the leaves they were: logical dtype, numpy scalar or jax.Array."""
        dtypes = [self._dtypes[i] for i in idx]
        views = {d: logical_view(d) for d in dict.fromkeys(dtypes)}
        out: list[Any]
        batch: list[int]
        if KEY not in views.values() and "scalar" not in kinds:  # the usual case, at C speed
            if any(v is not None for v in views.values()):
                out = list(map(as_view, arrays, map(views.__getitem__, dtypes)))
            else:
                out = list(arrays)
            if as_numpy:
                batch = []
            elif kinds.count("jax") == len(kinds):
                batch = list(range(len(out)))
            else:
                batch = [b for b, kind in enumerate(kinds) if kind == "jax"]
        else:
            out, batch = [], []
            for arr, dtype, kind in zip(arrays, dtypes, kinds):
                view = views[dtype]
                if view is not None:
                    if view is KEY:
                        out.append(from_storable(arr, dtype))
                        continue
                    arr = arr.view(view)
                if kind == "jax":
                    if not as_numpy:
                        batch.append(len(out))
                elif kind == "scalar":
                    arr = arr[()]
                out.append(arr)
        if batch and targets.count(None) == len(targets):  # no target shardings: all to the default
            if len(batch) == len(out):
                return device_put_many(out)
            for b, y in zip(batch, device_put_many([out[b] for b in batch])):
                out[b] = y
        elif batch:
            default = jax.sharding.make_single_device_sharding(jax.devices()[0])
            groups: dict[Any, list[int]] = {}
            for b in batch:
                sharding = getattr(targets[b], "sharding", None)
                groups.setdefault(None if sharding == default else sharding, []).append(b)
            for sharding, members in groups.items():
                xs = [out[b] for b in members]
                ys = device_put_many(xs) if sharding is None else jax.device_put(xs, sharding)
                for b, y in zip(members, ys):
                    out[b] = y
        return out

    def close(self) -> None:
        self._reader.close()

    def __enter__(self) -> PytreeFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _sds_dtype(name: str) -> Any:
    if is_key_dtype_name(name):
        return jax.random.key(0, impl=key_impl_of(name)).dtype
    return dtype_from_name(name)


_ARRAY_KIND_SET = frozenset(_treespec.ARRAY_KINDS)


def _array_kinds(structure: Any) -> list[str]:
    if not isinstance(structure, dict) or "root" not in structure:
        raise FileFormatError("the header has no tree structure")
    kinds: list[str] = []
    stack = [structure["root"]]
    while stack:
        n = stack.pop()
        if type(n) is str:
            if n not in _treespec.ARRAY_KINDS:
                raise FileFormatError(f"invalid tree structure: unknown leaf kind {n!r:.40}")
            kinds.append(n)
        elif not isinstance(n, dict):
            raise FileFormatError("invalid tree structure: a node is not a JSON object")
        elif isinstance(n.get("children"), list):
            kids = n["children"]
            if kids and set(map(type, kids)) == {str} and _ARRAY_KIND_SET.issuperset(kids):
                kinds += kids  # a node of array leaves only
            else:
                stack.extend(reversed(kids))
    return kinds
