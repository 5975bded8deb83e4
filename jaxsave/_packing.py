"""Leaves packed into one flat buffer per dtype, so a flush sends few arrays.

Every argument of an ``io_callback`` costs about 0.1 ms on top of the call
itself, so a model with 100 parameter leaves would pay 10 ms per flush. The ring
buffer therefore keeps one flat buffer per storage dtype; each leaf owns a
contiguous stretch of it, ``rows`` rows long (leaf-major), so on the host every
leaf of a chain is a contiguous view, no copy.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_batching import custom_vmap

__all__ = ["Packing", "pack", "unpack"]


class Slot(NamedTuple):
    """Where leaf ``j`` lives: buffer ``group``, elements ``[start, start + rows * size)``."""

    group: int
    start: int
    size: int


class Packing(NamedTuple):
    """How leaves of the given row shapes and dtypes share one flat buffer per dtype."""

    rows: int
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[np.dtype, ...]  # one per buffer
    slots: tuple[Slot, ...]  # one per leaf

    @classmethod
    def build(cls, rows: int, shapes: Sequence[tuple[int, ...]], dtypes: Sequence[np.dtype]) -> Packing:
        groups: list[np.dtype] = []
        used: list[int] = []
        slots = []
        for shape, dtype in zip(shapes, dtypes):
            dtype = np.dtype(dtype)
            if dtype not in groups:
                groups.append(dtype)
                used.append(0)
            g, size = groups.index(dtype), math.prod(shape)
            slots.append(Slot(g, used[g], size))
            used[g] += rows * size
        return cls(rows, tuple(map(tuple, shapes)), tuple(groups), tuple(slots))

    def zeros(self) -> tuple[jax.Array, ...]:
        """The empty buffers of one chain."""
        totals = [0] * len(self.dtypes)
        for slot in self.slots:
            totals[slot.group] = max(totals[slot.group], slot.start + self.rows * slot.size)
        return tuple(jnp.zeros((n,), dtype) for n, dtype in zip(totals, self.dtypes))

    def write(self, buffers: tuple[jax.Array, ...], mask: jax.Array, leaves: Sequence[jax.Array],
              keep: jax.Array, row: jax.Array) -> tuple[tuple[jax.Array, ...], jax.Array]:
        """``(buffers, mask)`` with the leaves and ``keep`` written as row ``row``, in place (also under vmap)."""
        plan = (*((s.group, s.start, s.size) for s in self.slots), (len(buffers), 0, 1))
        pieces = (*(jnp.reshape(x, (-1,)) for x in leaves), jnp.reshape(keep, (1,)))
        *buffers, mask = _writer(plan)((*buffers, mask), pieces, row)
        return tuple(buffers), mask

    def unpack(self, buffers: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Host side: leaf ``j`` as ``(chains, rows, *shape)`` views of buffers ``(*chains, n)``."""
        flat = [np.asarray(b).reshape(-1, np.shape(b)[-1]) for b in buffers]
        return [
            flat[s.group][:, s.start:s.start + self.rows * s.size].reshape(-1, self.rows, *shape)
            for s, shape in zip(self.slots, self.shapes)
        ]


@functools.lru_cache(maxsize=None)
def _writer(plan: tuple[tuple[int, int, int], ...]) -> Callable:
    """``write(buffers, pieces, row)``: piece i at ``start + row * size`` of buffer ``group`` (last axis).

    Under vmap a batched ``row`` is taken from the first chain: vmapped chains
    advance together (the host checks it), so the write stays an in-place
    dynamic-update-slice instead of becoming a scatter that copies the buffer.
    """

    @custom_vmap
    def write(buffers, pieces, row):
        out = list(buffers)
        for (group, start, size), piece in zip(plan, pieces):
            buf = out[group]
            out[group] = lax.dynamic_update_slice_in_dim(buf, piece, start + row * size, buf.ndim - 1)
        return tuple(out)

    @write.def_vmap
    def _write_vmap(axis_size, in_batched, buffers, pieces, row):
        buffers_b, pieces_b, row_b = in_batched
        buffers = _broadcast(buffers, buffers_b, axis_size)
        pieces = _broadcast(pieces, pieces_b, axis_size)
        out = write(buffers, pieces, row[0] if row_b else row)
        return out, tuple(True for _ in out)

    return write


def _broadcast(tree, batched, size):
    return jax.tree.map(lambda x, b: x if b else jnp.broadcast_to(x, (size, *jnp.shape(x))), tree, batched)


def pack(leaves: Sequence[jax.Array], batch_ndim: int) -> tuple[tuple[jax.Array, ...], tuple]:
    """Device side: concatenate leaves by dtype along a flat last axis; returns (buffers, layout)."""
    groups: dict[np.dtype, list[jax.Array]] = {}
    layout = []
    for x in leaves:
        batch, shape = x.shape[:batch_ndim], x.shape[batch_ndim:]
        group = groups.setdefault(np.dtype(x.dtype), [])
        layout.append((list(groups).index(np.dtype(x.dtype)), len(group), shape))
        group.append(jnp.reshape(x, (*batch, math.prod(shape))))
    buffers = tuple(jnp.concatenate(g, axis=-1) if len(g) > 1 else g[0] for g in groups.values())
    return buffers, tuple(layout)


def unpack(buffers: Sequence[np.ndarray], layout: tuple) -> list[np.ndarray]:
    """Host side: the leaves :func:`pack` concatenated, as ``(chains, *shape)`` views."""
    offsets: dict[int, int] = {}
    leaves = []
    for group, _, shape in layout:
        buf = np.asarray(buffers[group])
        flat = buf.reshape(-1, buf.shape[-1])
        start, size = offsets.get(group, 0), math.prod(shape)
        leaves.append(flat[:, start:start + size].reshape(-1, *shape))
        offsets[group] = start + size
    return leaves
