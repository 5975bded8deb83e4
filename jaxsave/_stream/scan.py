"""``jaxsave.scan``: a ``lax.scan`` whose per-step samples stream to a saver's collector.

``save()`` inside the user's own scan writes each sample into the state's ring
buffer, and the loop body carries that buffer. ``jaxsave.scan`` owns the loop
instead: an inner ``lax.scan`` of one block of steps stacks the samples as its
outputs (as a sampler that keeps them on the device would), and one callback per
block sends them. The body stays as light as the stacking loop's. With
``thin=k`` each stacked row is a nested scan of ``k`` steps of which only the
last makes a sample, as a thinned stacking loop would, so the skipped steps stack
nothing. The steps after the last whole block leave as one shorter block.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax import lax

from jaxsave._stream.packing import rows_of, span_of, with_span
from jaxsave._stream.state import SaveFn, Saver, SaveState, check_one_chain, check_state
from jaxsave._stream.streamer import Streamer

__all__ = ["scan"]


def scan(
    save: Saver | SaveFn,
    f: Callable[[Any, Any], tuple[Any, tuple[Any, Any]]],
    state: SaveState,
    init: Any,
    xs: Any = None,
    length: int | None = None,
    *,
    thin: int = 1,
    checkpoint: Callable[[Any], Any] | None = None,
) -> tuple[SaveState, Any]:
    """``lax.scan(f, init, xs, length)`` that streams ``f``'s samples; returns ``(state, carry)``.

    ``f(carry, x) -> (carry, (keep, sample))``: ``keep`` is the step's boolean keep
    flag and ``sample`` the pytree to save, as for ``save(state, keep, sample)``.
    ``save`` is the saver from :func:`jaxsave.save` (or its ``save`` function) and
    ``state`` its saving state. Call it inside ``jit`` (and ``vmap``, for chains),
    like ``save``; ``postprocess`` the returned state as usual. Blocks of the saver's
    ``block_size`` samples run as an inner scan whose stacked outputs leave in one
    callback, so the loop costs about what stacking the samples on the device
    costs. ``thin=k`` keeps only the sample of every ``k``-th step (steps ``k-1``,
    ``2k-1``, ... of this call, and only where its ``keep`` is true): the other steps
    run in a nested scan that stacks nothing. With ``checkpoint_every`` (a multiple
    of ``thin``), pass ``checkpoint(carry) -> solver_state``: it is checkpointed at
    every ``checkpoint_every``-th step.

    >>> import jax, jax.numpy as jnp, jaxsave
    >>> saver = jaxsave.save(jaxsave.MemoryCollector())
    >>> state = saver.init({"x": jnp.zeros(())}, None)
    >>> def step(x, i):
    ...     return x + 1.0, (i % 2 == 0, {"x": x})
    >>> run = jax.jit(lambda s: jaxsave.scan(saver, step, s, jnp.float32(0), jnp.arange(5)))
    >>> state, x = run(state)
    >>> saver.postprocess(state)["samples"]["x"].tolist()
    [0.0, 2.0, 4.0]
    >>> saver = jaxsave.save(jaxsave.MemoryCollector())
    >>> state = saver.init({"x": jnp.zeros(())}, None)
    >>> step = lambda x, i: (x + 1.0, (True, {"x": x}))
    >>> run = jax.jit(lambda s: jaxsave.scan(saver, step, s, jnp.float32(0), length=10, thin=3))
    >>> saver.postprocess(run(state)[0])["samples"]["x"].tolist()
    [2.0, 5.0, 8.0]
    """
    streamer = _streamer_of(save)
    check_state(state, "jaxsave.scan")
    check_one_chain(state, "jaxsave.scan")
    if not callable(f):
        raise TypeError(f"jaxsave.scan: f must be the step function f(carry, x), got {type(f).__name__}")
    if checkpoint is not None and not callable(checkpoint):
        raise TypeError(
            f"jaxsave.scan: checkpoint must be a function of the carry, got {type(checkpoint).__name__}"
        )
    thin = _positive_int(thin, "thin")
    n = _length(xs, length)
    _check_step(f, init, xs)
    rows = streamer.block_size or 1
    every = streamer.checkpoint_every
    if every:
        if checkpoint is None:
            raise ValueError(
                "this saver has checkpoint_every; pass jaxsave.scan(..., checkpoint=fn), where "
                "fn(carry) returns the solver_state to checkpoint"
            )
        if every % thin:
            raise ValueError(
                f"jaxsave.scan: thin={thin} must divide the saver's checkpoint_every={every}, so that "
                "every checkpoint step ends a block"
            )
        rows = _divisor_at_most(every // thin, rows)  # blocks end on checkpoint steps
    groups, rest = divmod(n, thin)  # a group: thin steps, the last one's sample stacked
    blocks, tail = divmod(groups, rows)

    def skipped_step(carry, x):
        return f(carry, x)[0], None

    def kept_group(carry, x_group):
        x = x_group
        if thin > 1:
            carry, _ = lax.scan(skipped_step, carry, _part(x_group, slice(None, -1)), length=thin - 1)
            x = _part(x_group, -1)
        carry, (keep, sample) = f(carry, x)
        return carry, streamer.sample_row(keep, sample)

    def send(state, carry, x_groups, count):
        carry, (mask, data) = lax.scan(kept_group, carry, x_groups, length=count)
        solver = checkpoint(carry) if checkpoint is not None else None
        return streamer.save_rows(state, mask, data, solver, steps=count * thin), carry

    def one_block(both, x_block):
        return send(*both, x_block, rows), None

    grouped = _part(xs, slice(None, groups * thin), (groups, thin) if thin > 1 else (groups,))
    both = (state, init)
    if blocks:
        head = _part(grouped, slice(None, blocks * rows), (blocks, rows))
        both, _ = lax.scan(one_block, both, head, length=blocks)
    state, carry = both
    if tail:  # the groups after the last whole block: one shorter block
        state, carry = send(state, carry, _part(grouped, slice(blocks * rows, None)), tail)
    if rest:  # steps that end no group keep nothing: the next block (or postprocess) covers them
        carry, _ = lax.scan(skipped_step, carry, _part(xs, slice(groups * thin, None)), length=rest)
        fill = with_span(rows_of(state.fill), span_of(state.fill) + rest)  # the block's span grows
        state = state._replace(step=state.step + rest, fill=fill)
    return state, carry


def _part(xs: Any, index: Any, shape: tuple[int, ...] | None = None) -> Any:
    """``x[index]`` of every leaf of ``xs``, its leading axis then reshaped to ``shape``."""

    def one(x):
        x = x[index]
        return x if shape is None else x.reshape(*shape, *x.shape[1:])

    return jax.tree.map(one, xs)


def _streamer_of(save: Any) -> Streamer:
    target = save.save if isinstance(save, Saver) else save
    streamer = getattr(target, "__self__", None)
    if not isinstance(streamer, Streamer) or getattr(target, "__func__", None) is not Streamer.save:
        raise TypeError(
            "jaxsave.scan needs the saver returned by jaxsave.save(collector) (or its save "
            f"function), got {type(save).__name__}; no_save() states are stacked by save() itself"
        )
    return streamer


def _check_static(value: Any, name: str) -> None:
    """Refuse an array (traced or not) where a Python int fixes the loop's shape."""
    if isinstance(value, (jax.Array, np.ndarray)):
        raise ValueError(
            f"jaxsave.scan: {name} must be a static Python int (it fixes the loop's shape at "
            f"trace time), got an array {value!r}; pass e.g. {name}=10, not jnp.int32(10)"
        )


def _positive_int(value: Any, name: str) -> int:
    _check_static(value, name)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"jaxsave.scan: {name} must be a positive int, got {value!r}")
    return int(value)


def _length(xs: Any, length: Any) -> int:
    if length is not None:
        _check_static(length, "length")
        if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 0:
            raise ValueError(f"jaxsave.scan: length must be an int >= 0, got {length!r}")
        length = operator.index(length)
    leaves = jax.tree.leaves(xs)
    if any(not np.ndim(x) for x in leaves):
        raise ValueError("jaxsave.scan: every leaf of xs needs a leading axis to scan over")
    lengths = {int(np.shape(x)[0]) for x in leaves}
    if length is not None:
        lengths.add(length)
    if len(lengths) != 1:
        raise ValueError(
            f"jaxsave.scan: the leading axes of xs and length disagree ({sorted(lengths)})"
            if lengths
            else "jaxsave.scan needs xs with a leading axis or length"
        )
    return lengths.pop()


def _check_step(f: Callable, init: Any, xs: Any) -> None:
    """Refuse an ``f`` that does not return ``(carry, (keep, sample))`` with ``init``'s carry."""
    x = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a)[1:], a.dtype), xs)
    out = jax.eval_shape(f, init, x)
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], tuple) and len(out[1]) == 2):
        raise TypeError(
            f"jaxsave.scan: f(carry, x) must return (carry, (keep, sample)), got {jax.tree.structure(out)}"
        )
    want, got = jax.eval_shape(lambda c: c, init), out[0]
    structure: Any = jax.tree.structure(want)
    if structure != jax.tree.structure(got):
        raise TypeError(
            "jaxsave.scan: f must return a carry of the structure of init: got "
            f"{jax.tree.structure(got)}, want {structure}"
        )
    for path, a, b in zip(
        (jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(want)),
        jax.tree.leaves(want),
        jax.tree.leaves(got),
    ):
        if a.shape != b.shape:
            raise TypeError(
                f"jaxsave.scan: f changes the shape of the carry{path} from {a.shape} to {b.shape}"
            )


def _divisor_at_most(n: int, limit: int) -> int:
    """The largest divisor of ``n`` that is at most ``limit``."""
    return max(d for k in range(1, math.isqrt(n) + 1) if n % k == 0 for d in (k, n // k) if d <= limit)
