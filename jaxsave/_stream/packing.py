"""Leaves packed into one buffer per dtype, so a flush sends few arrays.

Every argument of an ``io_callback`` costs about 0.1 ms on top of the call
itself, so a model with 100 parameter leaves would pay 10 ms per flush. The ring
buffer therefore keeps one buffer per storage dtype, ``(rows, n)``: a row is the
concatenation of that dtype's leaves, flattened. A sample that is one large
leaf keeps its own layout (a leaf sharded over devices stays sharded the same way
in the buffer), and on the host each leaf is a view, no copy.
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

from jaxsave._stream.resume import broadcast_unbatched

__all__ = ["SPAN_SHIFT", "Packing", "advance", "pack", "rows_of", "span_of", "unpack", "with_span"]

#: The state's ``fill`` holds two counters in one int32, so that the loop carries one value for
#: both: the rows of the ring buffer in use (the low bits), and the steps since the block began
#: (the high bits, saturating at ``SPAN_MAX``), from which the host tells each block's first step.
SPAN_SHIFT = 13
ROWS_MASK = (1 << SPAN_SHIFT) - 1  # rows: at most 4096 (a block's automatic size limit)
SPAN_MAX = (1 << (31 - SPAN_SHIFT)) - 1


def rows_of(fill):
    """The ring buffer's rows in use, of a state's (or a header's) ``fill``."""
    return fill & ROWS_MASK


def span_of(fill):
    """The steps since the block began, of ``fill`` (``SPAN_MAX``: at least that many)."""
    return fill >> SPAN_SHIFT


def with_span(rows, span):
    """A ``fill`` of ``rows`` rows and ``span`` steps (saturated at ``SPAN_MAX``)."""
    return rows + (jnp.minimum(span, SPAN_MAX) << SPAN_SHIFT).astype(jnp.int32)


class Slot(NamedTuple):
    """Where leaf ``j`` lives: columns ``[start, start + size)`` of buffer ``group``."""

    group: int
    start: int
    size: int


class Packing(NamedTuple):
    """How leaves of the given row shapes and dtypes share one ``(rows, n)`` buffer per dtype."""

    rows: int
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[np.dtype, ...]  # one per buffer
    widths: tuple[int, ...]  # one per buffer
    slots: tuple[Slot, ...]  # one per leaf

    @classmethod
    def build(cls, rows: int, shapes: Sequence[tuple[int, ...]], dtypes: Sequence[np.dtype]) -> Packing:
        groups: list[np.dtype] = []
        widths: list[int] = []
        slots = []
        for shape, dtype in zip(shapes, dtypes):
            dtype = np.dtype(dtype)
            if dtype not in groups:
                groups.append(dtype)
                widths.append(0)
            g, size = groups.index(dtype), math.prod(shape)
            slots.append(Slot(g, widths[g], size))
            widths[g] += size
        return cls(rows, tuple(map(tuple, shapes)), tuple(groups), tuple(widths), tuple(slots))

    @property
    def unbuffered(self) -> bool:
        """Blocks of one row leave as they are made: the state keeps no buffer, no row is copied into one."""
        return self.rows == 1

    def zeros(self) -> tuple[jax.Array, ...]:
        """The empty buffers of one chain (no rows if :attr:`unbuffered`)."""
        rows = 0 if self.unbuffered else self.rows
        return tuple(jnp.zeros((rows, n), dtype) for n, dtype in zip(self.widths, self.dtypes))

    def row(self, leaves: Sequence[jax.Array]) -> tuple[jax.Array, ...]:
        """One sample's leaves as one flat row per buffer (the leaves of a dtype concatenated)."""
        parts: list[list[jax.Array]] = [[] for _ in self.dtypes]
        for slot, x in zip(self.slots, leaves):
            parts[slot.group].append(jnp.reshape(x, (slot.size,)))
        return tuple(p[0] if len(p) == 1 else jnp.concatenate(p) for p in parts)

    def write(
        self,
        buffers: tuple[jax.Array, ...],
        mask: jax.Array,
        leaves: Sequence[jax.Array],
        keep: jax.Array,
        row: jax.Array,
    ) -> tuple[tuple[jax.Array, ...], jax.Array]:
        """``(buffers, mask)`` with the leaves and ``keep`` written as row ``row``, in place
        (also under vmap).

        If :attr:`unbuffered`, the returned buffers are the one-row block to send,
        not the state's (empty) buffers.
        """
        rows = self.row(leaves)
        if self.unbuffered:
            return tuple(r[None] for r in rows), jnp.reshape(keep, (1,))
        *buffers, mask = _row_writer(0)((*buffers, mask), (*rows, keep), row)
        return tuple(buffers), mask

    def unpack(self, buffers: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Host side: leaf ``j`` as ``(chains, rows, *shape)`` views of buffers ``(*chains, rows, n)``."""
        flat = [np.asarray(b) for b in buffers]
        flat = [b.reshape(math.prod(b.shape[:-2]), *b.shape[-2:]) for b in flat]
        return [
            flat[s.group][:, :, s.start : s.start + s.size].reshape(*flat[s.group].shape[:2], *shape)
            for s, shape in zip(self.slots, self.shapes)
        ]


@functools.cache
def _row_writer(axis: int) -> Callable:
    """``write(buffers, rows, index)``: each row written at ``index`` along ``axis`` of its buffer.

    Under vmap a batched ``index`` is taken from the first chain: vmapped chains
    advance together (the host checks it), so the write stays an in-place
    dynamic-update-slice instead of becoming a scatter that copies the buffer.
    """

    @custom_vmap
    def write(buffers, rows, index):
        return tuple(_put_row(b, r, index, axis) for b, r in zip(buffers, rows))

    @write.def_vmap
    def _write_vmap(axis_size, in_batched, buffers, rows, index):
        buffers_b, rows_b, index_b = in_batched
        buffers = broadcast_unbatched(buffers, buffers_b, axis_size)
        rows = broadcast_unbatched(rows, rows_b, axis_size)
        out = _row_writer(axis + 1)(buffers, rows, index[0] if index_b else index)
        return out, tuple(True for _ in out)

    return write


def _put_row(buffer: jax.Array, row: jax.Array, index: jax.Array, axis: int) -> jax.Array:
    """``buffer`` with ``row`` written at ``index`` (never negative) along ``axis``, in place."""
    starts = [jnp.zeros((), jnp.int32)] * buffer.ndim
    starts[axis] = index
    return lax.dynamic_update_slice(
        buffer, lax.expand_dims(row, (axis,)), starts, allow_negative_indices=False
    )


@custom_vmap
def advance(fill: jax.Array, keep: jax.Array) -> jax.Array:
    """``fill`` after a step: a row more if ``keep`` (only kept steps take a row), a step more
    in its span (see :data:`SPAN_SHIFT`).

    Vmapped chains share their rows (one in-place write for all of them), so under
    vmap a row is taken when *any* chain keeps; each chain's keep bits tell the
    host which rows are its own.
    """
    step = jnp.where(span_of(fill) < SPAN_MAX, 1 << SPAN_SHIFT, 0).astype(fill.dtype)
    return fill + keep.astype(fill.dtype) + step


@advance.def_vmap
def _advance_vmap(axis_size, in_batched, fill, keep):
    fill_b, keep_b = in_batched
    out = advance(fill[0] if fill_b else fill, jnp.any(keep, axis=0) if keep_b else keep)
    return jnp.broadcast_to(out, (axis_size, *jnp.shape(out))), True


def pack(leaves: Sequence[jax.Array], batch_ndim: int) -> tuple[tuple[jax.Array, ...], tuple]:
    """Device side: concatenate leaves by dtype along a flat last axis; returns (buffers, placement)."""
    groups: dict[np.dtype, list[jax.Array]] = {}
    placement = []
    for x in leaves:
        batch, shape = x.shape[:batch_ndim], x.shape[batch_ndim:]
        group = groups.setdefault(np.dtype(x.dtype), [])
        placement.append((list(groups).index(np.dtype(x.dtype)), len(group), shape))
        group.append(jnp.reshape(x, (*batch, math.prod(shape))))
    buffers = tuple(jnp.concatenate(g, axis=-1) if len(g) > 1 else g[0] for g in groups.values())
    return buffers, tuple(placement)


def unpack(buffers: Sequence[np.ndarray], placement: tuple) -> list[np.ndarray]:
    """Host side: the leaves :func:`pack` concatenated, as ``(chains, *shape)`` views."""
    offsets: dict[int, int] = {}
    leaves = []
    for group, _, shape in placement:
        buf = np.asarray(buffers[group])
        flat = buf.reshape(math.prod(buf.shape[:-1]), buf.shape[-1])
        start, size = offsets.get(group, 0), math.prod(shape)
        leaves.append(flat[:, start : start + size].reshape(len(flat), *shape))
        offsets[group] = start + size
    return leaves
