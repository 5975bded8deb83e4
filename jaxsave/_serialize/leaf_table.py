"""The leaf table of a pytree file's header (format 2): three columns over the array leaves,
``{"names": [...], "dtypes": [...], "shapes": [...]}``, the dtypes as logical names.

Writing, :func:`leaf_table_and_arrays` gives the table and each leaf as a storable array
(ml_dtypes as unsigned integers, PRNG keys as their key data); :func:`unique_names`
makes the names unique. Reading, :func:`read_leaf_table` validates a table (bounded, at C
speed) and gives each array's storage shape and dtype; :func:`logical_view` says how a
stored array is viewed back as its logical dtype.
"""

from __future__ import annotations

import functools
from itertools import chain
from typing import Any, NamedTuple, NoReturn

import jax
import numpy as np

from jaxsave._core.dtypes import (
    LeafSpec,
    dtype_from_name,
    is_key_dtype_name,
    key_data_shape,
    leaf_spec,
    storage_dtype,
    to_storable,
)
from jaxsave._core.transfer import host_array
from jaxsave.errors import FileFormatError

#: What :func:`logical_view` returns for a PRNG key dtype (rebuilt from its key data).
KEY = "key"
#: Bounds of a stored shape: at most this many axes, each below ``_MAX_DIM``.
_MAX_NDIM = 64
_MAX_DIM = 2**62
#: dtype -> (logical dtype name, dtype of the stored view or None): the fast path.
_DTYPE_INFO: dict[Any, tuple[str, Any]] = {}


class LeafTable(NamedTuple):
    """A validated leaf table: per array leaf, its name, shape and logical dtype name, and
    ``storage``, the ``(shape, dtype name)`` its stored array has (key data for PRNG keys)."""

    names: list[str]
    shapes: list[tuple[int, ...]]
    dtypes: list[str]
    storage: list[tuple[tuple[int, ...], str]]


def leaf_columns(names: list[Any], dtypes: list[Any], shapes: list[Any]) -> dict[str, list[Any]]:
    """The table of a header, from its three columns."""
    return {"names": names, "dtypes": dtypes, "shapes": shapes}


def unique_names(names: list[str]) -> list[str]:
    """``names`` with a ``~n`` suffix on the n-th repeat of a name (the first ``n`` that no
    other name takes).

    >>> unique_names(["a", "a~1", "a", "b"])
    ['a', 'a~1', 'a~2', 'b']
    """
    if len(set(names)) == len(names):
        return names
    taken = set(names)
    repeats: dict[str, int] = {}  # name -> the n to try first for its next repeat
    out = []
    for name in names:
        if name in repeats:
            repeat, n = suffixed(name, taken, repeats[name])
            repeats[name] = n + 1
            name = repeat
        else:
            repeats[name] = 1
        out.append(name)
    return out


def suffixed(name: str, taken: set[str], n: int = 1) -> tuple[str, int]:
    """``name~k`` for the first ``k >= n`` that ``taken`` lacks, and ``k``; added to ``taken``.

    >>> suffixed("a", {"a", "a~1"})
    ('a~2', 2)
    """
    while f"{name}~{n}" in taken:
        n += 1
    taken.add(f"{name}~{n}")
    return f"{name}~{n}", n


def _storable(name: str, leaf: Any) -> tuple[str, np.ndarray]:
    """The logical dtype name and a C-contiguous storable array of one leaf."""
    if isinstance(leaf, jax.ShapeDtypeStruct):
        raise TypeError(f"leaf {name!r} is a ShapeDtypeStruct, which holds no data to save")
    if isinstance(leaf, np.ndarray) and not leaf.dtype.isnative:  # e.g. ">f4" from a foreign file
        leaf = leaf.astype(leaf.dtype.newbyteorder("="))  # the bytes the dtype's name stands for here
    info = _DTYPE_INFO.get(leaf.dtype)
    if info is None:
        if not isinstance(leaf.dtype, np.dtype):  # an extended dtype: a typed PRNG key
            arr = to_storable(leaf)
            return leaf_spec(leaf).dtype, arr if arr.flags.c_contiguous else arr.copy()
        dtype_name = leaf_spec(leaf).dtype
        try:
            dtype_from_name(dtype_name)
        except FileFormatError:
            raise TypeError(
                f"leaf {name!r} has dtype {leaf.dtype}, which jaxsave cannot "
                "store (object, string and structured arrays need pickle)"
            ) from None
        view = to_storable(np.empty(0, leaf.dtype)).dtype
        info = _DTYPE_INFO[leaf.dtype] = (dtype_name, None if view == leaf.dtype else view)
    if info[1] is not None and isinstance(leaf, jax.Array):
        # An ml_dtypes jax.Array has no buffer protocol: np.asarray would try it
        # (and its fallbacks) before __array__ (see host_array).
        arr = host_array(leaf)
    else:
        arr = np.asarray(leaf)
    if not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr).reshape(arr.shape)
    return info[0], arr if info[1] is None else arr.view(info[1])


def leaf_table_and_arrays(
    names: list[str], leaves: list[Any]
) -> tuple[dict[str, list[Any]], list[np.ndarray]]:
    """The header's leaf table and the storable arrays (:func:`_storable`, inlined)."""
    dtypes, shapes, arrays = [], [], []
    info_of = _DTYPE_INFO.get
    array_types = (jax.Array, np.ndarray)
    for name, leaf in zip(names, leaves):
        info = info_of(leaf.dtype)
        if info is None or not isinstance(leaf, array_types):  # the first of its dtype, keys, scalars...
            dtype, arr = _storable(name, leaf)
        else:
            dtype, view = info
            if view is None:
                arr = np.asarray(leaf)
            else:
                arr = host_array(leaf) if isinstance(leaf, jax.Array) else np.asarray(leaf)
            if not arr.flags.c_contiguous:
                arr = np.ascontiguousarray(arr).reshape(arr.shape)
            if view is not None:
                arr = arr.view(view)
        dtypes.append(dtype)
        shapes.append(list(leaf.shape))
        arrays.append(arr)
    return leaf_columns(names, dtypes, shapes), arrays


@functools.lru_cache(maxsize=256)
def logical_view(dtype: str) -> Any:
    """``None`` if stored as is, :data:`KEY` for PRNG keys, else the dtype to view the storage as.

    Raises :class:`~jaxsave.errors.FileFormatError` for names outside the whitelist.
    """
    if not isinstance(dtype, str):
        raise FileFormatError(f"a dtype name must be a string, got {type(dtype).__name__}")
    if is_key_dtype_name(dtype):
        key_data_shape(LeafSpec((), dtype))  # validates the implementation's name
        return KEY
    logical = dtype_from_name(dtype)
    return None if storage_dtype(dtype) == logical else logical


def as_view(arr: np.ndarray, view: Any) -> np.ndarray:
    """``arr`` viewed as ``view`` (a :func:`logical_view` that is not :data:`KEY`)."""
    return arr if view is None else arr.view(view)


def read_leaf_table(leaves: Any) -> LeafTable:
    """The header's leaf table ``leaves``, validated; a :class:`FileFormatError` names what is wrong."""
    if not isinstance(leaves, dict):
        raise FileFormatError("the header has no leaf table")
    columns = _columns(leaves)
    if columns is None:
        _explain(leaves)  # raises, naming the first bad leaf
    names, shape_lists, dtypes = columns
    shapes: list[tuple[int, ...]] = list(map(tuple, shape_lists))
    keys = [d for d in dict.fromkeys(dtypes) if logical_view(d) is KEY]  # validates every name
    storage = list(zip(shapes, dtypes))
    if keys:
        storage = [(key_data_shape(LeafSpec(*sd)), sd[1]) if sd[1] in keys else sd for sd in storage]
    return LeafTable(names, shapes, dtypes, storage)


def _all_of_type(values: list[Any], cls: type) -> bool:
    return not values or set(map(type, values)) == {cls}


def _columns(leaves: dict[str, Any]) -> tuple[list[str], list[list[int]], list[str]] | None:
    """The names, shapes and dtypes of the leaf table, or ``None`` if anything is malformed.

    Checked at C speed (``set(map(type, ...))``, ``min``/``max``): three columns of one
    length, str names and dtypes, and shapes that are lists of at most 64 int dims in
    [0, 2**62).
    """
    names, shapes, dtypes = leaves.get("names"), leaves.get("shapes"), leaves.get("dtypes")
    if not (type(names) is list and type(shapes) is list and type(dtypes) is list):
        return None
    if not len(names) == len(shapes) == len(dtypes):
        return None
    if not (_all_of_type(names, str) and _all_of_type(dtypes, str) and _all_of_type(shapes, list)):
        return None
    if shapes and max(map(len, shapes)) > _MAX_NDIM:
        return None
    dims = list(chain.from_iterable(shapes))
    if not _all_of_type(dims, int) or (dims and (min(dims) < 0 or max(dims) >= _MAX_DIM)):
        return None
    return names, shapes, dtypes


def _explain(leaves: dict[str, Any]) -> NoReturn:
    """Raise a :class:`FileFormatError` naming the first malformed leaf of the table."""
    columns = [leaves.get(c) for c in ("names", "dtypes", "shapes")]
    if not all(type(c) is list for c in columns):
        raise FileFormatError("the leaf table needs the lists 'names', 'dtypes' and 'shapes'")
    names, dtypes, shapes = columns
    if not len(names) == len(dtypes) == len(shapes):  # type: ignore[arg-type]
        raise FileFormatError(
            f"the leaf table's columns differ in length: {len(names)} names, "  # type: ignore[arg-type]
            f"{len(dtypes)} dtypes, {len(shapes)} shapes"  # type: ignore[arg-type]
        )
    for i, (name, dtype, shape) in enumerate(zip(names, dtypes, shapes)):  # type: ignore[arg-type]
        if type(name) is not str:
            raise FileFormatError(f"leaf {i} of the header has no name")
        if type(shape) is not list or len(shape) > _MAX_NDIM:
            raise FileFormatError(f"leaf {name!r} has an invalid shape {shape!r:.80}")
        for d in shape:
            if type(d) is not int or d < 0 or d >= _MAX_DIM:
                raise FileFormatError(f"leaf {name!r} has an invalid shape {shape!r:.80}")
        if type(dtype) is not str:
            raise FileFormatError(f"leaf {name!r} has no dtype name")
    raise AssertionError("unreachable: the leaf table was found malformed")  # pragma: no cover
