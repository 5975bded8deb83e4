"""Turning any JAX/numpy array into something every storage format can hold, and back.

Two kinds of arrays need care:

* ml_dtypes types (bfloat16, the float8 family, int4, ...) are opaque void types to
  h5py, ``.npz`` and safetensors. They are stored as an unsigned-integer view of
  the same width, together with the dtype's name, and viewed back on read.
* typed PRNG keys (``jax.random.key``) cannot be turned into numpy at all. They are
  stored as ``jax.random.key_data`` plus the implementation's name and rebuilt
  with ``jax.random.wrap_key_data``.

Only names from a fixed whitelist are ever turned back into dtypes: a file cannot
make the loader import or call anything.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import ml_dtypes
import numpy as np

from jaxsave.errors import FileFormatError

#: ml_dtypes types that storage formats do not know, by name.
ML_DTYPES: dict[str, np.dtype] = {
    name: np.dtype(getattr(ml_dtypes, name))
    for name in (
        "bfloat16",
        "float8_e3m4",
        "float8_e4m3",
        "float8_e4m3b11fnuz",
        "float8_e4m3fn",
        "float8_e4m3fnuz",
        "float8_e5m2",
        "float8_e5m2fnuz",
        "float8_e8m0fnu",
        "float6_e2m3fn",
        "float6_e3m2fn",
        "float4_e2m1fn",
        "int1",
        "int2",
        "int4",
        "uint1",
        "uint2",
        "uint4",
    )
    if hasattr(ml_dtypes, name)
}

#: numpy dtypes every format stores natively, by name.
_NATIVE_DTYPES: dict[str, np.dtype] = {
    np.dtype(t).name: np.dtype(t)
    for t in (
        np.bool_,
        np.int8,
        np.int16,
        np.int32,
        np.int64,
        np.uint8,
        np.uint16,
        np.uint32,
        np.uint64,
        np.float16,
        np.float32,
        np.float64,
        np.complex64,
        np.complex128,
    )
}

_UINT_OF_WIDTH = {1: np.dtype(np.uint8), 2: np.dtype(np.uint16), 4: np.dtype(np.uint32)}

#: PRNG implementations that keys may be rebuilt with.
KEY_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")


def key_dtype_name(impl: str) -> str:
    """The recorded dtype name of a typed PRNG key of implementation ``impl``: ``key<impl>``."""
    return f"key<{impl}>"


def is_key_dtype_name(name: str) -> bool:
    """Whether ``name`` is a :func:`key_dtype_name`."""
    return name.startswith("key<") and name.endswith(">")


def key_impl_of(name: str) -> str:
    """The implementation in a :func:`key_dtype_name` (``"key<rbg>"`` -> ``"rbg"``)."""
    return name[len("key<") : -1]


class LeafSpec(NamedTuple):
    """What one array leaf is, in terms a file can record.

    ``dtype`` is the logical dtype's name (``"bfloat16"``, ``"float32"``, ...); for a
    typed PRNG key it is ``"key<impl>"`` and ``shape`` is the key array's shape
    (without the key-data dimension).
    """

    shape: tuple[int, ...]
    dtype: str

    @property
    def is_key(self) -> bool:
        return is_key_dtype_name(self.dtype)

    @property
    def key_impl(self) -> str:
        return key_impl_of(self.dtype)


def is_key(x: Any) -> bool:
    """Whether ``x`` is a typed PRNG key array."""
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _key_impl_name(x: Any) -> str:
    if isinstance(x, jax.ShapeDtypeStruct):  # key_impl() wants an array; the dtype knows its impl
        return x.dtype._impl.name
    return str(jax.random.key_impl(x))


def leaf_spec(x: Any) -> LeafSpec:
    """The :class:`LeafSpec` of an array, typed key, or Python scalar."""
    if is_key(x):
        return LeafSpec(tuple(x.shape), key_dtype_name(_key_impl_name(x)))
    if not hasattr(x, "dtype"):
        x = np.asarray(x)
    return LeafSpec(tuple(x.shape), np.dtype(x.dtype).name)


def dtype_from_name(name: str) -> np.dtype:
    """The numpy dtype called ``name``; only whitelisted names are accepted."""
    if not isinstance(name, str):
        raise FileFormatError(f"dtype name must be a string, got {type(name).__name__}")
    if name in _NATIVE_DTYPES:
        return _NATIVE_DTYPES[name]
    if name in ML_DTYPES:
        return ML_DTYPES[name]
    raise FileFormatError(f"unknown or unsupported dtype {name!r}")


def storage_dtype(name: str) -> np.dtype:
    """The dtype an array of logical dtype ``name`` has on disk."""
    if is_key_dtype_name(name):
        return np.dtype(np.uint32)
    dtype = dtype_from_name(name)
    return _UINT_OF_WIDTH[dtype.itemsize] if name in ML_DTYPES else dtype  # type: ignore[return-value]


def key_data_shape(spec: LeafSpec) -> tuple[int, ...]:
    """The shape of ``jax.random.key_data`` for a key leaf of this spec."""
    impl = spec.key_impl
    if impl not in KEY_IMPLS:
        raise FileFormatError(f"unknown PRNG key implementation {impl!r}")
    width = jax.random.key_data(jax.random.key(0, impl=impl)).shape
    return spec.shape + width


#: numpy's own dtypes (native byte order), stored as they are: :func:`to_storable` returns them at once.
_PLAIN_DTYPES = frozenset(np.dtype(c) for c in "?bhilqBHILQefdFD")


def to_storable(x: Any) -> np.ndarray:
    """``x`` as a numpy array of a dtype every format stores natively.

    Keys become their key data, ml_dtypes become an unsigned view of equal width.
    The logical dtype is not recorded here: keep the :func:`leaf_spec`.
    """
    if type(x) is np.ndarray and x.dtype in _PLAIN_DTYPES:  # the writer's every leaf: skip the checks
        return x
    if is_key(x):
        x = jax.random.key_data(x)
    arr = np.asarray(x)
    if arr.dtype.name in ML_DTYPES:
        return arr.view(_UINT_OF_WIDTH[arr.dtype.itemsize])  # type: ignore[call-overload]
    return arr


def from_storable(arr: np.ndarray, dtype: str) -> Any:
    """Undo :func:`to_storable`, given the logical dtype name recorded with it."""
    if is_key_dtype_name(dtype):
        impl = key_impl_of(dtype)
        if impl not in KEY_IMPLS:
            raise FileFormatError(f"unknown PRNG key implementation {impl!r}")
        return jax.random.wrap_key_data(np.asarray(arr, dtype=np.uint32), impl=impl)  # type: ignore[arg-type]
    target = dtype_from_name(dtype)
    arr = np.asarray(arr)
    if dtype in ML_DTYPES:
        if arr.dtype != _UINT_OF_WIDTH[target.itemsize]:
            raise FileFormatError(
                f"stored array for dtype {dtype} has dtype {arr.dtype}, "
                f"expected {_UINT_OF_WIDTH[target.itemsize]}"
            )
        return arr.view(target)
    if arr.dtype != target:
        raise FileFormatError(f"stored array has dtype {arr.dtype}, expected {dtype}")
    return arr
