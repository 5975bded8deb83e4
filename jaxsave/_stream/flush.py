"""The traced flush of a saver: one ``io_callback`` per block, for every vmapped chain.

:func:`make_flush` builds ``flush(pred, payload)``, which sends the block when ``pred``.
It sits in a ``custom_vmap`` whose batching rule folds the chain axes into the
payload, so C vmapped chains (nested vmaps included) cost one callback per block,
not C. Every argument of ``io_callback`` costs about 0.1 ms, so the per-chain
fields and the keep mask travel together as one int32 *header*, shaped
``(chains..., len(FIELDS) + rows)``: :func:`encode` (traced) and :func:`decode`
(host) are the only two places that know its columns. The samples travel as one
buffer per dtype (:mod:`jaxsave._stream.packing`), and the solver state, packed the
same way, only with blocks that end on a checkpoint step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_batching import custom_vmap

from jaxsave._stream import callback as _callback
from jaxsave._stream.packing import pack, rows_of
from jaxsave._stream.resume import broadcast_unbatched
from jaxsave.errors import SaverStateError

__all__ = ["FIELDS", "Header", "decode", "encode", "make_flush"]


class Header(NamedTuple):
    """One row per chain (numpy, on the host)."""

    active: np.ndarray  #: the chain's buffer was flushed at this step (bool)
    chains: np.ndarray  #: chain ids
    starts: np.ndarray  #: under vmap, the state's ``block_start`` (see :func:`carried_start`); else -1
    ends: np.ndarray  #: the step after the block's last
    fills: np.ndarray  #: rows of the ring buffer in use and steps of the block (packing.rows_of, span_of)
    mask: np.ndarray  #: keep bits of the rows in use, ``(chains, fill)``


#: The columns before the keep bits, in order (the names of :class:`Header`'s first fields).
FIELDS = Header._fields[:5]


def encode(
    active: jax.Array, chain: jax.Array, start: jax.Array, end: jax.Array, fill: jax.Array, mask: jax.Array
) -> jax.Array:
    """The header array: the fields (each shaped like ``chain``) as columns, then ``mask``.

    The kept samples so far are not sent, nor (but under vmap) the block's first
    step: the host counts them from each chain's previous blocks
    (:class:`jaxsave._stream.streamer.Streamer`), so the loop carries no counter for them.
    """
    fields = [active.astype(jnp.int32), chain, start, end, fill]
    return jnp.concatenate([jnp.stack(fields, axis=-1), mask.astype(jnp.int32)], axis=-1)


def decode(header: np.ndarray) -> Header:
    """The :class:`Header` of an :func:`encode` d array (chain axes flattened).

    >>> h = encode(*map(jnp.asarray, (True, 3, -1, 8, 2 + (4 << 13))), jnp.array([1, 0, 1, 1]))
    >>> d = decode(np.asarray(h)); d.chains.tolist(), d.ends.tolist(), d.mask.tolist()
    ([3], [8], [[True, False]])
    """
    rows = np.asarray(header).reshape(-1, np.shape(header)[-1])
    active, chains, starts, ends, fills = (rows[:, k] for k in range(len(FIELDS)))
    used = int(rows_of(fills[0])) if len(fills) else 0
    mask = rows[:, len(FIELDS) : len(FIELDS) + used].astype(bool)
    return Header(active.astype(bool), chains, starts, ends, fills, mask)


@custom_vmap
def carried_start(start: jax.Array, full: jax.Array, step: jax.Array) -> jax.Array:
    """The state's ``block_start`` after a step: under vmap, ``step`` where the block was
    sent (``full``); for one chain, unchanged.

    This is for XLA:CPU's scheduler, not for the host (which counts every block's
    steps itself). The flush of a vmapped loop reads the block start, so the loop body
    depends on it; without it XLA:CPU ran the body of 64 vmapped chains (key split
    in the carry) on two threads: 29 us a step of wall time and 45 of CPU time,
    against 25 / 25 with it. For one chain it is the other way: carrying an updated
    counter cost 1.3 us a step (2.5 against 1.2), so a one-chain loop carries it
    unchanged and its flush sends -1 (docs/performance.md).
    """
    return start


@carried_start.def_vmap
def _carried_start_vmap(axis_size, in_batched, start, full, step):
    start, full, step = broadcast_unbatched((start, full, step), tuple(in_batched), axis_size)
    return lax.select(full, step, start), True


def make_flush(receive: Callable[..., None], checkpoint_every: int) -> Callable[[Any, Any], None]:
    """``flush(pred, payload)``: if ``pred``, ``receive((header, data, solver))`` on the host.

    ``payload`` is ``(active, chain, start, end, fill, mask, data, ckpt)``; ``active`` is
    ``pred`` per chain, ``ckpt`` ``None`` or the solver state's leaves. ``active`` and ``start``
    are sent under vmap only: for one chain, true and -1, constants in the branch taken (one
    kernel less a step; ``start`` unused, so not computed: see :func:`carried_start`). The
    solver state is sent (``receive`` then gets ``solver_packing=``) only when an active chain's
    ``end`` is a multiple of ``checkpoint_every``; otherwise ``solver`` is ``None``.
    """

    def send(payload, vmapped):
        active, chain, start, end, fill, mask, data, ckpt = payload
        if not vmapped:  # in the branch taken, one chain's ``active`` is ``pred``: true
            active, start = jnp.ones_like(active), jnp.full_like(end, -1)
        header = encode(active, chain, start, end, fill, mask)
        if ckpt is None:
            _callback.send(receive, (header, data, None))
            return

        def with_solver_state():
            solver, packed = pack(ckpt, header.ndim - 1)  # concatenated only on checkpoint flushes
            _callback.send(functools.partial(receive, solver_packing=packed), (header, data, solver))

        lax.cond(
            jnp.any(active & (end % checkpoint_every == 0)),
            with_solver_state,
            lambda: _callback.send(receive, (header, data, None)),
        )

    def make(vmapped: bool) -> Callable[[Any, Any], None]:
        @custom_vmap
        def flush(pred, payload):
            lax.cond(pred, functools.partial(send, vmapped=vmapped), lambda p: None, payload)

        @flush.def_vmap
        def _flush_vmap(axis_size, in_batched, pred, payload):
            pred_batched, payload_batched = in_batched
            _check_chain_batched(pred_batched, payload_batched)
            payload = broadcast_unbatched(payload, payload_batched, axis_size)
            batched(jnp.any(pred) if pred_batched else pred, payload)
            return None, None

        return flush

    batched = make(vmapped=True)
    return make(vmapped=False)


def _check_chain_batched(pred_batched: bool, payload_batched: tuple) -> None:
    """Refuse a vmapped flush whose chain id is not batched: a state of one chain (``init``
    without ``chains=``) passed unmapped into ``vmap`` would send every chain's samples as its."""
    chain_batched = payload_batched[1]
    if not chain_batched and (pred_batched or any(jax.tree.leaves(payload_batched))):
        raise SaverStateError(
            "save() runs under jax.vmap, but this vmap does not map its saving state, so to it the "
            "state holds one chain (made by init without chains=, or closed over or passed with "
            "in_axes=None instead of mapped): every vmapped chain would save into that one. Create "
            "the state with init(init_sample, ..., chains=C), every leaf of init_sample with a "
            "leading axis of size C, and vmap over the state (in_axes=0)"
        )
