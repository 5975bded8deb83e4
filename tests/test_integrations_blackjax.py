"""BlackJAX kernels driven in ``lax.scan`` under ``vmap``, with jaxsave collecting (docs/integrations/blackjax.md)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsave

blackjax = pytest.importorskip("blackjax")

NOISE = 0.5


def linear_regression_data(n: int = 500, dim: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim)).astype(np.float32)
    w = np.array([1.0, -2.0, 0.5], np.float32)[:dim]
    y = (x @ w + NOISE * rng.normal(size=n)).astype(np.float32)
    return x, y


def exact_posterior(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviations of w for the prior w ~ N(0, I) and noise NOISE."""
    precision = np.eye(x.shape[1]) + x.T.astype(np.float64) @ x / NOISE**2
    cov = np.linalg.inv(precision)
    return cov @ x.T @ y / NOISE**2, np.sqrt(np.diag(cov))


def test_blackjax_sgld_chains_stream_to_hdf5(tmp_path):
    x, y = linear_regression_data()
    n, dim = x.shape
    xj, yj = jnp.asarray(x), jnp.asarray(y)
    logprior = lambda p: -0.5 * jnp.sum(p["w"] ** 2)
    loglik = lambda p, batch: -0.5 * jnp.sum((batch[1] - batch[0] @ p["w"]) ** 2) / NOISE**2
    sgld = blackjax.sgld(blackjax.sgmcmc.gradients.grad_estimator(logprior, loglik, n))

    chains, steps, burn_in, thin, batch_size, step_size = 4, 4000, 500, 5, 250, 4e-5
    path = tmp_path / "sgld.h5"
    init, save, postprocess = jaxsave.save(jaxsave.HDF5Collector(path), block_size=100)
    state = init({"w": jnp.zeros((chains, dim))}, None, chains=chains)

    def run_chain(state, key):
        def step(carry, i):
            state, position, key = carry
            key, k_batch, k_step = jax.random.split(key, 3)
            idx = jax.random.choice(k_batch, n, (batch_size,), replace=False)
            position = sgld.step(k_step, position, (xj[idx], yj[idx]), step_size)
            keep = (i >= burn_in) & ((i - burn_in) % thin == 0)
            state, _ = save(state, keep, position)
            return (state, position, key), (position["w"], keep)

        start = {"w": 3 * jax.random.normal(key, (dim,))}  # overdispersed
        (state, _, _), trace = jax.lax.scan(step, (state, sgld.init(start), key), jnp.arange(steps))
        return state, trace

    keys = jax.random.split(jax.random.key(0), chains)
    state, (positions, kept) = jax.jit(jax.vmap(run_chain))(state, keys)
    out = postprocess(state, None)
    per_chain = len(range(burn_in, steps, thin))
    assert out["sample_count"].tolist() == [per_chain] * chains

    samples = jaxsave.load_samples(path)["w"]
    assert samples.shape == (chains, per_chain, dim)
    # Exactly the kept positions of every chain, in order.
    np.testing.assert_array_equal(samples, np.asarray(positions)[np.asarray(kept)].reshape(samples.shape))
    mean, sd = exact_posterior(x, y)
    np.testing.assert_allclose(samples.reshape(-1, dim).mean(0), mean, atol=0.02)
    np.testing.assert_allclose(samples.reshape(-1, dim).std(0), sd, rtol=0.25)

    az = pytest.importorskip("arviz")
    summary = az.summary(jaxsave.to_inference_data(path))
    assert (summary["r_hat"] < 1.05).all(), summary


def test_blackjax_nuts_positions_and_info_as_sample_stats(tmp_path):
    """A NUTS kernel: the position goes to posterior/, the kernel's info to sample_stats/."""
    x, y = linear_regression_data(n=100)
    dim = x.shape[1]
    logdensity = lambda p: -0.5 * jnp.sum(p["w"] ** 2) - 0.5 * jnp.sum((y - x @ p["w"]) ** 2) / NOISE**2
    nuts = blackjax.nuts(logdensity, step_size=0.03, inverse_mass_matrix=jnp.ones(dim))

    chains, steps = 2, 200
    path = tmp_path / "nuts.h5"
    stats = ("acceptance_rate", "num_integration_steps", "is_divergent")
    init, save, postprocess = jaxsave.save(jaxsave.HDF5Collector(path, sample_stats=stats))
    template = {
        "w": jnp.zeros((chains, dim)),
        "acceptance_rate": jnp.zeros(chains),
        "num_integration_steps": jnp.zeros(chains, jnp.int32),
        "is_divergent": jnp.zeros(chains, bool),
    }
    state = init(template, None, chains=chains)

    def run_chain(state, key):
        def step(carry, key):
            state, hmc_state = carry
            hmc_state, info = nuts.step(key, hmc_state)
            sample = {"w": hmc_state.position["w"], **{k: getattr(info, k) for k in stats}}
            state, _ = save(state, True, sample)
            return (state, hmc_state), None

        hmc_state = nuts.init({"w": jnp.zeros(dim)})
        return jax.lax.scan(step, (state, hmc_state), jax.random.split(key, steps))[0][0]

    state = jax.jit(jax.vmap(run_chain))(state, jax.random.split(jax.random.key(1), chains))
    assert postprocess(state, None)["sample_count"].tolist() == [steps] * chains

    pytest.importorskip("arviz")
    idata = jaxsave.to_inference_data(path)
    assert sorted(idata.sample_stats.data_vars) == sorted(stats)
    assert idata.sample_stats["num_integration_steps"].dtype == np.int32
    assert float(idata.sample_stats["acceptance_rate"].mean()) > 0.6
    assert not bool(idata.sample_stats["is_divergent"].any())
    mean, sd = exact_posterior(x, y)
    draws = idata.posterior["w"].values[:, 50:].reshape(-1, dim)
    np.testing.assert_allclose(draws.mean(0), mean, atol=4 * sd.max())
