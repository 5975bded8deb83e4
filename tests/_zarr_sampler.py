"""A small deterministic sampler for the Zarr store tests (tests/test_zarr_s3.py, the S3 kill test).

``CHAINS`` vmapped chains of a random walk, run ``ROUND`` steps per jit-compiled call;
every other step is kept. The sample is ``{"x": (3,) float32, "lp": float32, "n": int32}``
(``lp`` and ``n`` go to ``sample_stats``); the solver state ``{"x", "key"}`` is all a
chain needs to continue, so a run resumed from a checkpoint at a multiple of ``ROUND``
steps is bit for bit the uninterrupted one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

CHAINS = 4
ROUND = 8  # steps per jit call; also the checkpoint interval
STATS = ("lp", "n")


def initial() -> dict:
    """The chains' solver state before the first step."""
    keys = jax.random.split(jax.random.PRNGKey(0), CHAINS)  # raw uint32 keys: (CHAINS, 2)
    return {"x": jnp.zeros((CHAINS, 3), jnp.float32), "key": keys}


def sample_template() -> dict:
    return {"x": jnp.zeros((CHAINS, 3)), "lp": jnp.zeros(CHAINS), "n": jnp.zeros(CHAINS, jnp.int32)}


def kept(steps: int) -> int:
    """Draws kept after ``steps`` steps."""
    return (steps + 1) // 2


def make_round(saver, checkpoints: bool = True):
    """``run(state, solver, start)``: ``ROUND`` steps of every chain from step ``start``, jit-compiled."""

    def step(carry, i):
        state, solver = carry
        key, sub = jax.random.split(solver["key"])
        x = 0.9 * solver["x"] + jax.random.normal(sub, (3,), jnp.float32)
        solver = {"x": x, "key": key}
        sample = {"x": x, "lp": -0.5 * jnp.sum(x * x), "n": i.astype(jnp.int32)}
        extra = {"solver_state": solver} if checkpoints else {}
        state, _ = saver.save(state, i % 2 == 0, sample, **extra)
        return (state, solver), None

    def chain(state, solver, start):
        return jax.lax.scan(step, (state, solver), start + jnp.arange(ROUND))[0]

    return jax.jit(jax.vmap(chain, in_axes=(0, 0, None)))


def run(saver, state, solver, start: int, stop: int, on_round=None):
    """Rounds from step ``start`` to ``stop`` (multiples of ``ROUND``); ``on_round(r)`` after each."""
    one = make_round(saver)
    for r, first in enumerate(range(start, stop, ROUND)):
        state, solver = one(state, solver, jnp.int32(first))
        if on_round is not None:
            on_round(r)
    return state, solver


def reference(steps: int) -> dict:
    """The uninterrupted run's samples, ``(chain, draw, ...)`` numpy arrays, through MemoryCollector."""
    import jaxsave

    saver = jaxsave.save(jaxsave.MemoryCollector(), checkpoint_every=ROUND)
    state = saver.init(sample_template(), initial(), chains=CHAINS)
    state, solver = run(saver, state, initial(), 0, steps)
    samples = saver.postprocess(state, None)["samples"]
    return {k: np.asarray(v) for k, v in samples.items()}


def same_bits(a, b) -> bool:
    """Whether two arrays hold the same dtype, shape and bytes."""
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
