"""The host side of a flush: the payload one callback brings, checked and made a :class:`Block`.

The flush callback (on an XLA thread) decodes the block's metadata, refuses chains
that are not at one step or were finished already, counts the block's steps and kept
samples (:class:`~jaxsave._stream.counting.BlockCounter`), and wraps the packed
buffers without unpacking them: the writer thread unpacks them. ``postprocess`` makes the
partial last blocks of a final state into blocks the same way (:func:`tail_blocks`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxsave._stream import flush as _flush
from jaxsave._stream import resume as _resume
from jaxsave._stream.counting import BlockCounter
from jaxsave._stream.packing import Packing, rows_of, span_of, unpack
from jaxsave._stream.state import check_distinct_chains
from jaxsave._stream.writer import Block
from jaxsave.errors import SaverStateError

__all__ = ["block_of", "tail_blocks"]


def block_of(
    payload: Any,
    solver_packing: tuple,
    *,
    packing: Packing,
    counter: BlockCounter,
    checkpoint_every: int,
    finished: set[int],
    closed: bool,
) -> Block:
    """The :class:`Block` of ``payload`` (``(meta, data, solver)`` from :mod:`jaxsave._stream.flush`).

    ``finished``: the chains ``postprocess`` finished; ``closed``: the saver has no live
    writer. Raises :class:`SaverStateError` for chains at different steps, a chain twice,
    a finished chain, or a block that does not continue its chain's last one.
    """
    meta, data, solver = payload
    active, chains, _, ends, fills, mask = _flush.decode(meta)
    rows = mask.shape[1]
    if (ends != ends[0]).any() or (rows_of(fills) != rows).any():
        raise SaverStateError(
            f"the vmapped chains {chains.tolist()} are at different steps {ends.tolist()}: "
            "stack only states that were created together (init(..., chains=n)) and "
            "advanced together"
        )
    check_distinct_chains(chains, "a block")
    done = sorted(set(chains[active].tolist()) & finished)
    if done or closed:
        raise SaverStateError(
            f"chain(s) {done or chains[active].tolist()} saved samples after postprocess "
            "finished them; start again from init"
        )
    starts, saved = counter.count(chains, ends, mask, active, span_of(fills), tail=False)
    checkpoints = None
    if solver is not None:
        flat = unpack(solver, solver_packing)
        checkpoints = _resume.records(chains, ends, saved, flat, active & (ends % checkpoint_every == 0))
    every = bool(active.all())
    pick = slice(None) if every else np.flatnonzero(active)

    def sample_leaves() -> list[np.ndarray]:  # on the writer's thread
        return [x[:, :rows] if every else x[pick, :rows] for x in packing.unpack(data)]

    return Block(
        chains[pick],
        starts[pick],
        ends[pick],
        mask[pick],
        None,
        checkpoints=checkpoints,
        keepalive=payload,
        unpack=sample_leaves,
        packed_bytes=sum(np.asarray(b).nbytes for b in data),
    )


def tail_blocks(
    chains: np.ndarray, steps: np.ndarray, state: Any, *, packing: Packing, counter: BlockCounter
) -> tuple[list[Block], np.ndarray]:
    """The partial last blocks of a final state (on the host) of ``chains`` at ``steps``, and each
    chain's kept count: chains holding as many rows share one block."""
    packed = np.asarray(state.fill).reshape(-1)
    fills, spans = rows_of(packed), span_of(packed)
    mask = np.asarray(state.keep_mask).reshape(len(chains), -1)
    leaves = packing.unpack(state.data)
    counts = np.zeros(len(chains), np.int64)
    blocks = []
    for tail in np.unique(fills):
        pick = np.flatnonzero(fills == tail)
        tails = mask[pick, :tail]
        starts, counts[pick] = counter.count(
            chains[pick], steps[pick], tails, np.ones(len(pick), bool), spans[pick], tail=True
        )
        blocks.append(
            Block(chains[pick], starts, steps[pick], tails, [x[pick, :tail] for x in leaves], tail=True)
        )
    return blocks, counts
