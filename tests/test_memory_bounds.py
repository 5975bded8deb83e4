"""Memory used by saving is bounded by the block size, not by the number of samples."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import PeakRSS

import jaxsave


@pytest.mark.slow
def test_streaming_2gb_to_hdf5_keeps_host_memory_flat(tmp_path):
    floats, steps = 2**16, 8192  # 256 KiB samples, 2 GiB in all
    saver = jaxsave.save(jaxsave.HDF5Collector(tmp_path / "big.h5"), block_size=16)
    state = saver.init({"x": jnp.zeros(floats)}, None)

    @jax.jit
    def run(state, x):
        def step(carry, i):
            state, x = carry
            x = x + 1.0
            return (saver.save(state, True, {"x": x})[0], x), None

        return jax.lax.scan(step, (state, x), jnp.arange(steps))[0]

    compiled = run.lower(state, jnp.zeros(floats)).compile()
    with PeakRSS() as rss:
        out, _ = compiled(state, jnp.zeros(floats))
        result = saver.postprocess(out, None)
    assert int(result["sample_count"]) == steps
    growth = (rss.peak - rss.base) / 2**20
    assert growth < 300, f"RSS grew by {growth:.0f} MiB while streaming 2 GiB"
    import h5py

    with h5py.File(tmp_path / "big.h5") as f:
        ds = f["posterior/x"]
        assert ds.shape == (1, steps, floats)
        np.testing.assert_array_equal(ds[0, [0, 4000, steps - 1], 0], [1, 4001, steps])
