"""Memory used by saving is bounded by the block size, not by the number of samples."""

import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsave

psutil = pytest.importorskip("psutil")


class PeakRSS:
    """Samples this process's resident memory every few milliseconds."""

    def __init__(self):
        self.proc = psutil.Process()
        self.base = self.proc.memory_info().rss
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.005)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


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
