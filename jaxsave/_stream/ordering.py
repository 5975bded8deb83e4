"""Terms that order a loop body's kernels for XLA:CPU without changing a value.

XLA:CPU runs a loop body's thunks by their data dependencies, and whenever more than 8 are
ready at once it hands half of them to another thread, at every step (``tests/_thunk_graph.py``):
for a step of a few microseconds that doubles the CPU time. ``save()``'s bookkeeping reads
little, so unless it waits for something computed late in the step, its kernels are ready at
the top of the step beside the user's own. These terms make a value wait for another one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["never", "tied_to"]


def never(x: jax.Array) -> jax.Array:
    """``False``, computed from the integer ``x``: ``(x | 1) == 0`` never holds, and XLA does not
    fold it. A value it joins waits for ``x`` in the loop body's thunk graph (tests/_thunk_graph.py)."""
    return (x | 1) == 0


def tied_to(keep: jax.Array, leaves: list[jax.Array]) -> jax.Array:
    """A constant ``keep``, made to wait for the sample's first element (its value unchanged).

    With a constant keep XLA folds the fill's advance into each of the five kernels that read the
    fill, all ready at the top of the step beside the user's own: under vmap 12 thunks ready at once
    with the light step of ``benchmarks/peer.py``, so XLA:CPU split every step over two threads
    (twice the CPU time; ``benchmarks/constant_keep.py``). Tied to the sample, 6 are. A traced keep
    is left alone: it already waits for what it is computed from.
    """
    for x in leaves:
        if x.size:
            first = jnp.reshape(x, (-1,))[0]
            if jnp.iscomplexobj(first):
                first = jnp.real(first)
            return keep & ~never(first.astype(jnp.int32))
    return keep
