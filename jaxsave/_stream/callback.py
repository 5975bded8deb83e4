"""``io_callback`` with arguments small enough to never deadlock a multi-device CPU run.

JAX hands a callback's arguments to the Python function through
``device_put`` to CPU device 0. The CPU client copies an array of 100 KiB or
more asynchronously, on the thread pool that also runs the devices' programs.
With several CPU devices (``--xla_force_host_platform_device_count``, or one
process driving many CPU devices), every device can be inside a callback, each
waiting for a copy that no free thread will ever make: the run hangs with the
CPU idle (measured: 8 devices x 8 chains hang from 102,400-byte blocks up,
never below). On such a backend, :func:`send` cuts every argument into pieces
under that size and the host glues them back (one copy on the host); on
accelerators and single-device CPU runs it is a plain ``io_callback``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.experimental import io_callback

__all__ = ["send"]

#: Arguments at or above the CPU client's synchronous-copy limit (102,400 bytes) are cut below it.
PIECE_BYTES = 96 * 1024


def _pieces_needed() -> bool:
    return jax.default_backend() == "cpu" and jax.local_device_count() > 1


def send(receive: Callable[[Any], None], payload: Any) -> None:
    """``receive(payload)`` on the host, called from traced code (unordered, for its effect)."""
    leaves, treedef = jax.tree.flatten(payload)
    if not _pieces_needed() or all(x.nbytes < PIECE_BYTES for x in leaves):
        io_callback(receive, None, payload, ordered=False)
        return
    pieces, plan = [], []
    for x in leaves:
        step = max(1, PIECE_BYTES // x.dtype.itemsize)
        flat = x.reshape(-1)
        cuts = [flat[i:i + step] for i in range(0, flat.size, step)] if x.nbytes >= PIECE_BYTES else [x]
        plan.append((tuple(x.shape), len(cuts)))
        pieces += cuts
    io_callback(functools.partial(_glued, receive, treedef, tuple(plan)), None, pieces, ordered=False)


def _glued(receive: Callable[[Any], None], treedef: Any, plan: tuple, pieces: list) -> None:
    it = iter(pieces)
    leaves = []
    for shape, count in plan:
        parts = [np.asarray(next(it)) for _ in range(count)]
        leaves.append(np.concatenate(parts).reshape(shape) if count > 1 else parts[0].reshape(shape))
    receive(jax.tree.unflatten(treedef, leaves))
