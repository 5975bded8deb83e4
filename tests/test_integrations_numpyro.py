"""A NumPyro model's potential, sampled by NumPyro's NUTS kernel in ``lax.scan`` under ``vmap``,
with jaxsave collecting the constrained samples (docs/integrations/numpyro.md)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsave

numpyro = pytest.importorskip("numpyro")
dist = pytest.importorskip("numpyro.distributions")
from numpyro.infer.hmc import hmc  # noqa: E402
from numpyro.infer.util import initialize_model  # noqa: E402


def model(y):
    mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
    sigma = numpyro.sample("sigma", dist.HalfNormal(5.0))
    numpyro.sample("y", dist.Normal(mu, sigma), obs=y)


def test_numpyro_nuts_in_scan_with_checkpoints(tmp_path):
    y = jnp.asarray(np.random.default_rng(0).normal(3.0, 2.0, 200), jnp.float32)
    chains, warmup, draws = 2, 150, 250
    keys = jax.random.split(jax.random.key(1), chains)
    models = [initialize_model(k, model, model_args=(y,)) for k in keys]
    potential_fn, postprocess_fn = models[0].potential_fn, models[0].postprocess_fn
    init_kernel, sample_kernel = hmc(potential_fn, algo="NUTS")
    hmc_states = [init_kernel(m.param_info, num_warmup=warmup, rng_key=k) for m, k in zip(models, keys)]
    hmc_state = jax.tree.map(lambda *xs: jnp.stack(xs), *hmc_states)  # chains on axis 0

    path = tmp_path / "numpyro.h5"
    collector = jaxsave.HDF5Collector(path, sample_stats=("diverging", "accept_prob"))
    saver = jaxsave.save(collector, checkpoint_every=100)
    template = {
        "mu": jnp.zeros(chains),
        "sigma": jnp.zeros(chains),
        "diverging": jnp.zeros(chains, bool),
        "accept_prob": jnp.zeros(chains),
    }
    state = saver.init(template, hmc_state, chains=chains)

    def run_chain(state, hmc_state):
        def step(carry, i):
            state, hmc_state = carry
            hmc_state = sample_kernel(hmc_state)
            constrained = postprocess_fn(hmc_state.z)  # sigma > 0 on the constrained scale
            sample = {**constrained, "diverging": hmc_state.diverging, "accept_prob": hmc_state.accept_prob}
            state, _ = saver.save(state, i >= warmup, sample, solver_state=hmc_state)
            return (state, hmc_state), None

        return jax.lax.scan(step, (state, hmc_state), jnp.arange(warmup + draws))[0]

    state, final = jax.jit(jax.vmap(run_chain))(state, hmc_state)
    assert saver.postprocess(state, None)["sample_count"].tolist() == [draws] * chains

    samples = jaxsave.load_samples(path)
    assert samples["sigma"].shape == (chains, draws) and (samples["sigma"] > 0).all()
    assert abs(samples["mu"].mean() - float(y.mean())) < 0.1  # posterior sd of mu is about 0.14
    assert abs(samples["sigma"].mean() - float(y.std())) < 0.15
    assert not samples["diverging"].any()

    # The whole NUTS state, adaptation included, is checkpointed and comes back typed.
    ckpt = jaxsave.resume(path, like=(jax.tree.map(lambda x: x[0], hmc_state), None))  # reads numpyro.h5.ckpt
    assert ckpt.step.tolist() == [400, 400]
    assert type(ckpt.solver_state).__name__ == "HMCState"
    np.testing.assert_array_equal(ckpt.solver_state.z["mu"], final.z["mu"])
    np.testing.assert_array_equal(ckpt.solver_state.adapt_state.step_size, final.adapt_state.step_size)

    az = pytest.importorskip("arviz")
    summary = az.summary(jaxsave.to_inference_data(path))
    assert list(summary.index) == ["mu", "sigma"] and (summary["r_hat"] < 1.05).all()
