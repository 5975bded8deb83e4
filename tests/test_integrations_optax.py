"""optax optimizer state in checkpoints (docs/integrations/optax.md).

An optax-driven loop (Adam with gradient clipping, noisy minibatch gradients)
records the parameters as samples and checkpoints ``(params, opt_state, key)``
from inside jit; stopping it and resuming from the checkpoint ends with exactly
the samples of an uninterrupted run. The same state round-trips through
:class:`jaxsave.Checkpointer`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsave

optax = pytest.importorskip("optax")

RNG = np.random.default_rng(0)
X = jnp.asarray(RNG.normal(size=(256, 4)), jnp.float32)
Y = X @ jnp.array([1.0, -1.0, 2.0, 0.5]) + 0.1 * jnp.asarray(RNG.normal(size=256), jnp.float32)
OPTIMIZER = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(3e-2))
STEPS, EVERY = 120, 25


def loss(params, idx):
    pred = X[idx] @ params["w"] + params["b"]
    return jnp.mean((pred - Y[idx]) ** 2)


def initial_solver():
    params = {"w": jnp.zeros(4), "b": jnp.float32(0.0)}
    return params, OPTIMIZER.init(params), jax.random.key(7)


def run(saver, state, solver, start, stop):
    def step(carry, i):
        state, (params, opt_state, key) = carry
        key, sub = jax.random.split(key)
        value, grads = jax.value_and_grad(loss)(params, jax.random.choice(sub, 256, (32,)))
        updates, opt_state = OPTIMIZER.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        solver = (params, opt_state, key)
        state, _ = saver.save(state, True, {"params": params, "loss": value}, solver_state=solver)
        return (state, solver), None

    return jax.lax.scan(step, (state, solver), jnp.arange(start, stop))[0]


SAMPLE = {"params": {"w": jnp.zeros(4), "b": jnp.float32(0.0)}, "loss": jnp.float32(0.0)}


def test_optax_state_checkpointed_inside_jit_resumes_exactly(tmp_path):
    reference = jaxsave.save(jaxsave.HDF5Collector(tmp_path / "reference.h5"), block_size=16)
    state = reference.init(SAMPLE, None)
    state, _ = jax.jit(lambda s, v: run(reference, s, v, 0, STEPS))(state, initial_solver())
    reference.postprocess(state, None)
    want = jaxsave.load_samples(tmp_path / "reference.h5", chain=0)
    assert float(want["loss"][-10:].mean()) < 0.1 * float(want["loss"][:10].mean())  # it trains

    collector = jaxsave.MemoryCollector()
    saver = jaxsave.save(collector, checkpoint_every=EVERY, block_size=5)
    state = saver.init(SAMPLE, initial_solver())
    state, _ = jax.jit(lambda s, v: run(saver, s, v, 0, 70))(state, initial_solver())
    jax.block_until_ready(state)
    del state  # the run stops here, without postprocess

    ckpt = jaxsave.resume(collector, like=(initial_solver(), None))
    params, opt_state, key = ckpt.solver_state
    assert int(ckpt.step) in (25, 50) and int(ckpt.sample_count) == int(ckpt.step)
    adam = opt_state[1][0]
    assert type(adam).__name__ == "ScaleByAdamState" and int(adam.count) == int(ckpt.step)
    assert jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)

    state = saver.init(SAMPLE, initial_solver(), resume=ckpt)
    state, _ = jax.jit(lambda s, v: run(saver, s, v, int(ckpt.step), STEPS))(state, ckpt.solver_state)
    got = saver.postprocess(state, None)
    assert int(got["sample_count"]) == STEPS
    jax.tree.map(np.testing.assert_array_equal, got["samples"], want)


def test_optax_state_through_checkpointer(tmp_path):
    params, opt_state, key = initial_solver()
    grads = jax.grad(loss)(params, jnp.arange(32))
    updates, opt_state = OPTIMIZER.update(grads, opt_state, params)
    tree = {"params": optax.apply_updates(params, updates), "opt_state": opt_state, "key": key}

    ckpt = jaxsave.Checkpointer(tmp_path, keep=2)
    for step in (1, 2, 3):
        ckpt.save(step, tree, metadata={"lr": 3e-2})
    assert ckpt.steps() == [2, 3]
    step, restored = ckpt.restore(like=tree)
    assert step == 3 and jax.tree.structure(restored) == jax.tree.structure(tree)
    jax.tree.map(
        lambda a, b: np.testing.assert_array_equal(
            jax.random.key_data(a) if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key) else a,
            jax.random.key_data(b) if jax.dtypes.issubdtype(b.dtype, jax.dtypes.prng_key) else b,
        ),
        restored,
        tree,
    )
    # The restored state keeps optimizing where the saved one would.
    again, _ = OPTIMIZER.update(grads, restored["opt_state"], restored["params"])
    expect, _ = OPTIMIZER.update(grads, tree["opt_state"], tree["params"])
    jax.tree.map(np.testing.assert_array_equal, again, expect)
