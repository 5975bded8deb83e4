"""Haiku, Flax and Equinox models whose parameters are the samples (docs/integrations/models.md).

Each test runs SGLD over a small MLP's parameters with two vmapped chains, streams
the parameter pytrees to HDF5, loads them back as the framework's own pytree and
makes posterior-predictive draws from them.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsave

X = jnp.linspace(-2.0, 2.0, 64)[:, None]
Y = jnp.sin(2.0 * X)
CHAINS, STEPS, THIN = 2, 300, 3


def haiku_model(key: jax.Array) -> tuple[Any, Callable]:
    hk = pytest.importorskip("haiku")
    net = hk.without_apply_rng(hk.transform(lambda x: hk.nets.MLP([16, 1])(x)))
    return net.init(key, X), net.apply


def flax_model(key: jax.Array) -> tuple[Any, Callable]:
    nn = pytest.importorskip("flax.linen")
    net = nn.Sequential([nn.Dense(16), nn.tanh, nn.Dense(1)])
    return net.init(key, X), net.apply


def equinox_model(key: jax.Array) -> tuple[Any, Callable]:
    eqx = pytest.importorskip("equinox")
    params, static = eqx.partition(eqx.nn.MLP(1, 1, 16, 1, activation=jnp.tanh, key=key), eqx.is_array)
    return params, lambda p, x: jax.vmap(eqx.combine(p, static))(x)


def sgld(saver: jaxsave.Saver, apply: Callable, state: Any, params: Any, key: jax.Array) -> tuple[Any, Any]:
    """SGLD on the parameters of ``apply``; returns the saving state and every kept parameter draw."""

    def log_posterior(p: Any) -> jax.Array:
        resid = apply(p, X) - Y
        return -0.5 * jnp.sum(resid**2) / 0.1**2 - 0.5 * sum(jnp.sum(w**2) for w in jax.tree.leaves(p))

    def step(carry, i):
        state, p, key = carry
        key, sub = jax.random.split(key)
        grad = jax.grad(log_posterior)(p)
        leaves, treedef = jax.tree.flatten(p)
        noise = jax.tree.unflatten(
            treedef,
            [jax.random.normal(k, w.shape) for k, w in zip(jax.random.split(sub, len(leaves)), leaves)],
        )
        p = jax.tree.map(lambda w, g, z: w + 0.5e-4 * g + 1e-2 * z, p, grad, noise)
        state, _ = saver.save(state, i % THIN == THIN - 1, p)
        return (state, p, key), p

    (state, _, _), trace = jax.lax.scan(step, (state, params, key), jnp.arange(STEPS))
    return state, jax.tree.map(lambda w: w[THIN - 1 :: THIN], trace)


@pytest.mark.parametrize(
    "make_model",
    [
        pytest.param(haiku_model, id="haiku"),
        pytest.param(
            flax_model, id="flax", marks=pytest.mark.slow
        ),  # the same path; keeps the default suite short
        pytest.param(equinox_model, id="equinox", marks=pytest.mark.slow),
    ],
)
def test_model_parameters_as_samples(tmp_path, make_model):
    keys = jax.random.split(jax.random.key(0), CHAINS)
    params, apply = make_model(keys[0])
    chain_params = jax.vmap(lambda k: make_model(k)[0])(keys)  # a different initialization per chain

    path = tmp_path / "params.h5"
    saver = jaxsave.save(jaxsave.HDF5Collector(path))
    state = saver.init(chain_params, None, chains=CHAINS)
    run = jax.jit(jax.vmap(lambda s, p, k: sgld(saver, apply, s, p, k)))
    state, trace = run(state, chain_params, jax.random.split(jax.random.key(1), CHAINS))
    draws = STEPS // THIN
    assert saver.postprocess(state, None)["sample_count"].tolist() == [draws] * CHAINS

    # Loaded with `like`: exactly the framework's tree, every draw bit-identical.
    loaded = jaxsave.load_samples(path, like=params)
    assert jax.tree.structure(loaded) == jax.tree.structure(params)
    jax.tree.map(np.testing.assert_array_equal, loaded, jax.tree.map(np.asarray, trace))
    # Without `like`, the stored tree structure (Haiku/Flax dicts, the Equinox module) comes back.
    assert jax.tree.structure(jaxsave.load_samples(path)) == jax.tree.structure(params)

    # Posterior predictive from the file: one prediction per (chain, draw).
    one_chain = jaxsave.load_samples(path, chain=1, like=params, draws=slice(draws // 2, None))
    predict = jax.vmap(lambda p: apply(p, X)[:, 0])
    preds = np.asarray(predict(one_chain))
    assert preds.shape == (draws - draws // 2, X.shape[0]) and np.isfinite(preds).all()
    assert np.mean((preds.mean(0) - np.asarray(Y[:, 0])) ** 2) < 0.05  # the network fits sin(2x)
    assert (preds.std(0) > 0).all()  # and its draws differ: predictive uncertainty
