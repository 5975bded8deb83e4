"""Sharded chains: what the saver needs to know about ``jax.sharding``.

Chains are sharded on their leading (chain) axis, over the devices of one
process (``shard_map``, ``pmap``, or ``jit`` with sharded inputs) or of several
(``jax.distributed``). A state whose chains live on several processes is not
fully addressable: each process's saver sees only its own chains
(:func:`local_part`).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

__all__ = ["local_part", "shard_state"]


def local_part(tree: Any) -> Any:
    """The chains of ``tree`` that live on this process, as host numpy arrays.

    A leaf that is not fully addressable (sharded over the devices of several
    processes) is cut to this process's shards, concatenated along the chain
    axis (axis 0) in global order; other leaves are fetched as they are.
    """

    def part(x: Any) -> Any:
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return jax.device_get(x)
        if x.ndim == 0:  # one chain's field, replicated: every process holds all of it
            return np.asarray(x.addressable_data(0))
        shards: dict[Any, Any] = {}
        for shard in x.addressable_shards:
            index = shard.index
            if any(
                s != slice(None) and (s.start or 0, s.stop) != (0, n) for s, n in zip(index[1:], x.shape[1:])
            ):
                raise ValueError(
                    f"a saving-state leaf of shape {x.shape} is split over processes along an axis "
                    f"other than the chain axis ({x.sharding}); shard the state only over its chain axis"
                )
            start = index[0].start or 0 if index else 0
            shards.setdefault(start, np.asarray(shard.data))
        return np.concatenate([shards[k] for k in sorted(shards)], axis=0)

    return jax.tree.map(part, tree)


def shard_state(state: Any, mesh: jax.sharding.Mesh, axis: str | tuple[str, ...] = "chains") -> Any:
    """Spread the chains of ``state`` (from ``init(..., chains=n)``) over ``mesh`` axis ``axis``.

    In one process this is ``jax.device_put(state, NamedSharding(mesh, P(axis)))``.
    With several processes (``jax.distributed``), each passes the state of its own
    chains, and the result is one global array whose chain axis is the
    processes' chains in process order.

    >>> import jax, jax.numpy as jnp, jaxsave
    >>> mesh = jax.make_mesh((1,), ("chains",))
    >>> init, save, postprocess = jaxsave.save()
    >>> state = jaxsave.shard_state(init(jnp.zeros((4, 2)), chains=4), mesh)
    >>> state.chain_id.sharding.spec == jax.sharding.PartitionSpec("chains")
    True
    >>> postprocess(state, None)["sample_count"].tolist()
    [0, 0, 0, 0]
    """
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axis))
    if jax.process_count() == 1:
        return jax.device_put(state, sharding)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), state)
