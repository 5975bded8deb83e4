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
from jaxsave._stream.packing import pack
from jaxsave._stream.resume import broadcast_unbatched
from jaxsave.errors import SaverStateError

__all__ = ["FIELDS", "Header", "decode", "encode", "make_flush"]


class Header(NamedTuple):
    """One row per chain (numpy, on the host)."""

    active: np.ndarray  #: the chain's buffer was flushed at this step (bool)
    chains: np.ndarray  #: chain ids
    ends: np.ndarray  #: the step after the block's last
    saved: np.ndarray  #: kept samples so far (meaningful on checkpoint steps)
    starts: np.ndarray  #: the step the block began at
    fills: np.ndarray  #: rows of the ring buffer in use
    mask: np.ndarray  #: keep bits of the rows in use, ``(chains, fill)``


#: The columns before the keep bits, in order (the names of :class:`Header`'s first fields).
FIELDS = Header._fields[:6]


def encode(
    active: jax.Array,
    chain: jax.Array,
    end: jax.Array,
    saved: jax.Array,
    start: jax.Array,
    fill: jax.Array,
    mask: jax.Array,
) -> jax.Array:
    """The header array: the fields (each shaped like ``chain``) as columns, then ``mask``."""
    fields = [active.astype(jnp.int32), chain, end, saved, start, fill]
    return jnp.concatenate([jnp.stack(fields, axis=-1), mask.astype(jnp.int32)], axis=-1)


def decode(header: np.ndarray) -> Header:
    """The :class:`Header` of an :func:`encode` d array (chain axes flattened).

    >>> h = encode(*map(jnp.asarray, (True, 3, 8, 5, 4, 2)), jnp.array([1, 0, 1, 1]))
    >>> d = decode(np.asarray(h)); d.chains.tolist(), d.ends.tolist(), d.mask.tolist()
    ([3], [8], [[True, False]])
    """
    rows = np.asarray(header).reshape(-1, np.shape(header)[-1])
    active, chains, ends, saved, starts, fills = (rows[:, k] for k in range(len(FIELDS)))
    used = int(fills[0]) if len(fills) else 0
    mask = rows[:, len(FIELDS) : len(FIELDS) + used].astype(bool)
    return Header(active.astype(bool), chains, ends, saved, starts, fills, mask)


def make_flush(receive: Callable[..., None], checkpoint_every: int) -> Callable[[Any, Any], None]:
    """``flush(pred, payload)``: if ``pred``, ``receive((header, data, solver))`` on the host.

    ``payload`` is ``(active, chain, start, end, fill, mask, data, ckpt)``; ``ckpt`` is
    ``None`` or ``(solver_leaves, saved)``. The solver state is sent (``receive`` then
    gets ``solver_packing=``) only when an active chain's ``end`` is a multiple of
    ``checkpoint_every``; otherwise ``solver`` is ``None``.
    """

    def send(payload):
        active, chain, start, end, fill, mask, data, ckpt = payload
        saved = ckpt[1] if ckpt is not None else jnp.zeros_like(end)
        header = encode(active, chain, end, saved, start, fill, mask)
        if ckpt is None:
            _callback.send(receive, (header, data, None))
            return

        def with_solver_state():
            solver, packed = pack(ckpt[0], header.ndim - 1)  # concatenated only on checkpoint flushes
            _callback.send(functools.partial(receive, solver_packing=packed), (header, data, solver))

        lax.cond(
            jnp.any(active & (end % checkpoint_every == 0)),
            with_solver_state,
            lambda: _callback.send(receive, (header, data, None)),
        )

    @custom_vmap
    def flush(pred, payload):
        lax.cond(pred, send, lambda p: None, payload)

    @flush.def_vmap
    def _flush_vmap(axis_size, in_batched, pred, payload):
        pred_batched, payload_batched = in_batched
        _check_chain_batched(pred_batched, payload_batched)
        payload = broadcast_unbatched(payload, payload_batched, axis_size)
        flush(jnp.any(pred) if pred_batched else pred, payload)
        return None, None

    return flush


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
