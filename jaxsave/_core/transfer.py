"""Moving many host arrays to the device at once, without jax's per-array Python cost.

``jax.device_put(list_of_arrays)`` spends about 20 us of Python per array (an
abstract value, a sharding, a deferred argument and a result handler each), so
10,000 small leaves take 0.2 s on a CPU although no byte is copied. For the
common case (numpy arrays to the default device, uncommitted: what
``jax.device_put(x)`` does) :func:`device_put_many` calls the same C++ transfer
that ``jax.device_put`` ends in, once per array, with the abstract value cached
per shape and dtype: about 4 us per array.

That entry point is jaxlib's, not a public API, so it is used only when it is
there and behaves: one array of every call also goes through ``jax.device_put``
(so the default device, ``jax.default_device`` contexts and the transfer guard
are jax's own), and the fast results must match it in type, abstract value and
sharding. Anything unexpected (a jaxlib without it, another signature, a
non-canonical dtype, a non-single-device default) falls back to
``jax.device_put``, which gives the same arrays.

>>> import numpy as np
>>> xs = device_put_many([np.arange(3), np.ones((2, 2), np.float32)])
>>> [type(x).__name__ for x in xs], xs[1].dtype.name, xs[0].committed
(['ArrayImpl', 'ArrayImpl'], 'float32', False)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

try:  # jaxlib's C++ transfer, the one jax.device_put calls (pxla.batched_device_put)
    from jaxlib._jax import batched_device_put as _batched_device_put
except ImportError:  # pragma: no cover - another jaxlib layout: the public path only
    _batched_device_put = None


def _is_single_device_class(sharding: Any) -> bool:  # jax < 0.12.1, where the class is not deprecated
    return isinstance(sharding, jax.sharding.SingleDeviceSharding)


#: Whether a sharding places an array on one device: jax 0.12.1 deprecates testing for the class
#: ``jax.sharding.SingleDeviceSharding`` and gives this function instead.
is_single_device_sharding: Callable[[Any], bool] = getattr(
    jax.sharding, "is_single_device_sharding", _is_single_device_class
)


__all__ = ["device_put_many", "host_array", "FAST_MIN_ARRAYS", "fast_path_available"]

#: Below this many arrays, ``jax.device_put`` is used as it is (the fast path saves nothing).
FAST_MIN_ARRAYS = 16

#: Cleared for good when the fast path once raised or disagreed with ``jax.device_put``.
_FAST_OK = [_batched_device_put is not None]


def fast_path_available() -> bool:
    """Whether :func:`device_put_many` uses jaxlib's transfer directly (else ``jax.device_put``)."""
    return _FAST_OK[0]


def device_put_many(arrays: Sequence[np.ndarray]) -> list[jax.Array]:
    """``jax.device_put(list(arrays))`` (default device, uncommitted), at a fraction of the cost.

    ``arrays`` are numpy arrays; what comes back is what ``jax.device_put`` gives,
    in order. On CPU the arrays are not copied (as with ``jax.device_put``), so
    they must not be written to afterwards.
    """
    arrays = list(arrays)
    if len(arrays) < FAST_MIN_ARRAYS or not _FAST_OK[0]:
        return jax.device_put(arrays)  # type: ignore[no-any-return]
    try:
        out = _fast(arrays)
    except Exception:  # an unexpected jaxlib: never again, and the public path now
        _FAST_OK[0] = False
        out = None
    if out is None:
        return jax.device_put(arrays)  # type: ignore[no-any-return]
    return out


def _fast(arrays: list[np.ndarray]) -> list[jax.Array] | None:
    """The fast transfer, or ``None`` where it does not apply."""
    ref = None
    sharding: Any = None
    devices: list[Any] = []
    avals: dict[tuple[Any, ...], Any] = {}
    slow: list[int] = []
    out: list[Any] = []
    put = _batched_device_put
    for i, x in enumerate(arrays):
        aval = avals.get((x.shape, x.dtype)) if type(x) is np.ndarray else None
        if aval is None:
            if type(x) is not np.ndarray or jax.dtypes.canonicalize_dtype(x.dtype) != x.dtype:
                slow.append(i)  # jax converts these (x64 disabled...): its own path
                out.append(None)
                continue
            if ref is None:  # jax decides: the device, its context, the transfer guard
                ref = jax.device_put(x)
                sharding = ref.sharding
                if not is_single_device_sharding(sharding) or ref.committed:
                    return None
                devices = [next(iter(sharding.device_set))]
            aval = avals[(x.shape, x.dtype)] = jax.typeof(x)
            y = put(aval, sharding, [x], devices, False)  # type: ignore[misc]
            if ref is not None and len(avals) == 1 and not _same(y, ref):  # the first one
                _FAST_OK[0] = False
                return None
            out.append(y)
            continue
        out.append(put(aval, sharding, [x], devices, False))  # type: ignore[misc]
    if slow:
        for i, y in zip(slow, jax.device_put([arrays[i] for i in slow])):
            out[i] = y
    return out


def _same(y: Any, ref: jax.Array) -> bool:
    """Whether ``y`` is what ``jax.device_put`` made (``ref``): type, abstract value, placement."""
    return (
        type(y) is type(ref)
        and jax.typeof(y) == jax.typeof(ref)
        and y.sharding == ref.sharding
        and y.committed == ref.committed
    )


#: Cleared for good when the fast host copy once raised or disagreed with ``__array__``.
_HOST_FAST_OK = [True]
_HOST_CHECKED: list[bool] = [False]


def host_array(x: jax.Array) -> np.ndarray:
    """``np.asarray(x)`` for a single-device ``jax.Array`` of an ml_dtypes dtype (bfloat16...), faster.

    Such arrays have no buffer protocol, so ``np.asarray`` tries it and its
    fallbacks before ``__array__``, whose Python layers cost another 3 us. This
    calls the C++ method that ``__array__`` ends in (checked against
    ``__array__`` on first use; ``__array__`` where it is missing or differs).
    The result is read-only (it may be the device buffer itself on CPU).

    >>> import jax.numpy as jnp
    >>> host_array(jnp.arange(3, dtype=jnp.bfloat16)).tolist()
    [0.0, 1.0, 2.0]
    """
    if not _HOST_FAST_OK[0] or not is_single_device_sharding(x.sharding):
        return x.__array__()
    try:
        arr = x._single_device_array_to_np_array_did_copy()[0]  # type: ignore[attr-defined]
    except Exception:  # another jaxlib, or an array this process cannot read: __array__ says why
        _HOST_FAST_OK[0] = False
        return x.__array__()
    if not _HOST_CHECKED[0]:
        ref = x.__array__()
        if not (
            type(arr) is np.ndarray
            and arr.dtype == ref.dtype
            and arr.shape == ref.shape
            and arr.tobytes() == ref.tobytes()
        ):
            _HOST_FAST_OK[0] = False
            return ref
        _HOST_CHECKED[0] = True
    return arr  # type: ignore[no-any-return]
