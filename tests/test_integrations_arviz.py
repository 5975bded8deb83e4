"""ArviZ on a saved file: ``to_inference_data``, ``az.summary``, ``az.plot_trace`` (docs/integrations/arviz.md)."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import group_names

import jaxsave
from jaxsave._store import arviz as _arviz

az = pytest.importorskip("arviz")
matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")


@pytest.fixture(scope="module")
def sample_file(tmp_path_factory):
    """Three chains of a Langevin sampler on N(mu, diag(sd^2)), with a log-density stat."""
    mu, sd = jnp.array([1.0, -2.0]), jnp.array([0.5, 2.0])
    path = tmp_path_factory.mktemp("arviz") / "chains.h5"
    init, save, postprocess = jaxsave.save(jaxsave.HDF5Collector(path, sample_stats=("lp",)))
    chains, steps = 3, 6000
    state = init({"theta": jnp.zeros((chains, 2)), "lp": jnp.zeros(chains)}, None, chains=chains)

    def chain(state, key):
        def step(carry, i):
            state, x, key = carry
            key, sub = jax.random.split(key)
            eps = 0.2 * sd**2  # preconditioned Langevin
            x = x - 0.5 * eps * (x - mu) / sd**2 + jnp.sqrt(eps) * jax.random.normal(sub, (2,))
            lp = -0.5 * jnp.sum(((x - mu) / sd) ** 2)
            state, _ = save(state, (i >= 1000) & (i % 5 == 0), {"theta": x, "lp": lp})
            return (state, x, key), None

        return jax.lax.scan(step, (state, jnp.zeros(2), key), jnp.arange(steps))[0][0]

    state = jax.jit(jax.vmap(chain))(state, jax.random.split(jax.random.key(0), chains))
    postprocess(state, None)
    return path, np.asarray(mu), np.asarray(sd)


def test_inference_data_has_named_dimensions(sample_file):
    path, _, _ = sample_file
    idata = jaxsave.to_inference_data(path)
    assert group_names(idata) == {"posterior", "sample_stats"}
    assert dict(idata.posterior["theta"].sizes) == {"chain": 3, "draw": 1000, "theta_dim_0": 2}
    np.testing.assert_array_equal(idata.posterior["theta"].values, jaxsave.load_samples(path)["theta"])
    assert "lp" in idata.sample_stats


def test_summary_recovers_the_target(sample_file):
    path, mu, sd = sample_file
    summary = az.summary(jaxsave.to_inference_data(path))
    assert list(summary.index) == ["theta[0]", "theta[1]"]
    assert (summary["r_hat"] < 1.02).all() and (summary["ess_bulk"] > 300).all()
    np.testing.assert_allclose(summary["mean"], mu, atol=4 * summary["mcse_mean"].max() + 0.05)
    np.testing.assert_allclose(summary["sd"], sd, rtol=0.15)


def test_plot_trace_draws_every_chain(sample_file):
    import matplotlib.pyplot as plt

    path, _, _ = sample_file
    idata = jaxsave.to_inference_data(path)
    try:
        if _arviz.major_version(az) >= 1:  # a PlotCollection: its artists, by variable and dims
            lines = az.plot_trace(idata, var_names=["theta"]).viz["trace"]["theta"]
            assert dict(lines.sizes) == {"chain": 3, "theta_dim_0": 2}  # one line per chain and entry
            last = lines.sel(chain=2, theta_dim_0=1).item().get_ydata()
        else:  # an array of matplotlib axes: theta[0], theta[1] x density | trace
            axes = az.plot_trace(idata, var_names=["theta"], compact=False)
            assert axes.shape == (2, 2)
            trace_lines = axes[1, 1].get_lines()
            assert len(trace_lines) == 3  # one per chain
            last = trace_lines[2].get_ydata()
        np.testing.assert_allclose(last, idata.posterior["theta"].values[2, :, 1])
    finally:
        plt.close("all")


def test_live_file_is_readable_by_arviz_mid_run(tmp_path):
    """A file that a sampler is still writing already gives an InferenceData of the draws so far."""
    path = tmp_path / "live.h5"
    init, save, postprocess = jaxsave.save(jaxsave.HDF5Collector(path, flush_interval=0), block_size=10)
    state = init({"x": jnp.zeros(())})
    step = jax.jit(lambda s, i: save(s, True, {"x": i.astype(jnp.float32)})[0])
    for i in range(25):
        state = step(state, jnp.int32(i))
    jax.effects_barrier()
    live = jaxsave.open_live(path)
    try:
        deadline = time.monotonic() + 60  # the writer thread registers chain 0, then writes 2 blocks
        while live.sample_counts.tolist() != [20] and time.monotonic() < deadline:
            live.refresh()  # all chains: chain 0 may not be in the file yet
            time.sleep(0.05)
        assert live.sample_counts.tolist() == [20]
        assert live.refresh(chain=0)["x"].tolist() == list(map(float, range(20)))
    finally:
        postprocess(state, None)
    idata = jaxsave.to_inference_data(path)
    assert idata.posterior["x"].values.tolist() == [list(map(float, range(25)))]


@pytest.mark.parametrize(
    "samples, message",
    [
        (
            {"a.b": np.zeros((1, 3)), "a": {"b": np.ones((1, 3))}},
            "leaves 'a/b' and 'a.b' both become posterior/a.b",
        ),
        ({"chain": np.zeros((1, 3)), "y": np.ones((1, 3))}, "'chain', which is a dimension name"),
    ],
    ids=["two leaves, one name", "a dimension's name"],
)
def test_a_postprocess_result_whose_names_clash_is_refused(samples, message):
    # the dict path dropped a leaf (ArviZ 1.x) or raised a bare KeyError (0.x); the files refuse
    # such samples at init
    result = {"sample_count": np.array([3]), "samples": samples}
    with pytest.raises(jaxsave.StructureMismatchError, match=message):
        jaxsave.to_inference_data(result)


def test_a_postprocess_results_sample_stats_as_a_string_is_a_type_error():
    result = {"sample_count": np.array([3]), "samples": {"lp": np.zeros((1, 3)), "x": np.ones((1, 3))}}
    with pytest.raises(
        TypeError, match="sample_stats must be a sequence of names or a predicate, not a string"
    ):
        jaxsave.to_inference_data(result, sample_stats="lp")
    assert list(jaxsave.to_inference_data(result, sample_stats=("lp",))["sample_stats"].data_vars) == ["lp"]
