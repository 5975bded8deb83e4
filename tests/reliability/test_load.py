"""Load and concurrency: long many-chain streams in flat memory; savers and collectors used from threads.

Every sample carries its chain and step, so a lost, duplicated or reordered
sample shows up as a mismatch against ``arange``.
"""

from __future__ import annotations

import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import PeakRSS

import jaxsave

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(600)]

CHAINS, STEPS, CHUNKS = 64, 100_000, 20


def _device_bytes() -> int:
    """Bytes held by live arrays on the device (on GPUs, what the allocator reports in use)."""
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_in_use" in stats:
        return int(stats["bytes_in_use"])
    return sum(a.nbytes for a in jax.live_arrays())


def test_64_chains_100k_steps_stream_in_flat_memory(tmp_path, figures):
    path = tmp_path / "long.h5"
    saver = jaxsave.save(jaxsave.HDF5Collector(path))
    state = saver.init(
        {"x": jnp.zeros((CHAINS, 4)), "i": jnp.zeros(CHAINS, jnp.int32), "c": jnp.zeros(CHAINS, jnp.int32)},
        None,
        chains=CHAINS,
    )
    per_chunk = STEPS // CHUNKS

    def chain(state, x, c, start):
        def step(carry, i):
            state, x = carry
            x = 0.99 * x + 0.01 * jnp.sin(i + c)
            state, _ = saver.save(state, True, {"x": x, "i": i, "c": c})
            return (state, x), None

        return jax.lax.scan(step, (state, x), start + jnp.arange(per_chunk))[0]

    run = jax.jit(jax.vmap(chain, in_axes=(0, 0, 0, None)))
    x, ids = jnp.zeros((CHAINS, 4)), jnp.arange(CHAINS, dtype=jnp.int32)
    after_chunk, device_after_chunk = [], []
    start = time.monotonic()
    with PeakRSS(interval=0.02) as rss:
        for k in range(CHUNKS):
            state, x = run(state, x, ids, k * per_chunk)
            jax.block_until_ready(state)
            # Measured with the writer idle: a block queued or in the writer's hands is held memory
            # (bounded by max_queue_bytes, checked by the peak), and on the CPU a callback's arrays
            # are views of device buffers, so it would count as device memory too.
            saver.init.__self__.writer.drain()
            after_chunk.append(rss.proc.memory_info().rss)
            device_after_chunk.append(_device_bytes())
        out = saver.postprocess(state, None)
    seconds = time.monotonic() - start
    assert out["sample_count"].tolist() == [STEPS] * CHAINS
    # Flat after warm-up (the first quarter: compilation, HDF5 caches): a leak grows with the steps, so even
    # the least memory held in the last quarter would exceed the most held in the first.
    warm = CHUNKS // 4
    growth = (min(after_chunk[-warm:]) - max(after_chunk[:warm])) / 2**20
    device_growth = (min(device_after_chunk[-warm:]) - max(device_after_chunk[:warm])) / 2**20
    peak = (rss.peak - rss.base) / 2**20
    mib = [round(r / 2**20) for r in after_chunk]
    # Some growth remains while the allocator's arenas settle; it levels off (about +170 MiB over the start
    # after ~1M steps: benchmarks/reliability_figures.py --long). HDF5's metadata cache stays near 1 MiB.
    assert growth < 64, f"host RSS grew by {growth:.0f} MiB after warm-up: {mib}"
    assert peak < 64 + 128, f"host RSS peaked {peak:.0f} MiB over the start (queue bound: 64 MiB): {mib}"
    assert device_growth < 1, f"device memory grew by {device_growth:.1f} MiB: {device_after_chunk}"
    samples = jaxsave.load_samples(path)
    np.testing.assert_array_equal(samples["i"], np.broadcast_to(np.arange(STEPS), (CHAINS, STEPS)))
    np.testing.assert_array_equal(samples["c"], np.broadcast_to(np.arange(CHAINS)[:, None], (CHAINS, STEPS)))
    figures(
        "load",
        "64 vmapped chains x 100k steps to HDF5",
        samples=CHAINS * STEPS,
        seconds=round(seconds, 1),
        rss_growth_after_warmup_mb=round(growth, 1),
        peak_rss_over_start_mb=round(peak, 1),
        device_growth_mb=round(device_growth, 2),
        device_bytes_mb=round(device_after_chunk[-1] / 2**20, 1),
    )


def _chain_loop(saver, state, c, steps, chunk=500):
    """Run one (unbatched) chain; every sample is (chain, step)."""
    run = jax.jit(
        lambda s, start: jax.lax.scan(
            lambda s, i: saver.save(s, (i % 3) != 1, {"c": c, "i": i}), s, start + jnp.arange(chunk)
        )[0]
    )
    for start in range(0, steps, chunk):
        state = run(state, start)
    return state


def _expect(c, steps):
    i = np.arange(steps)
    return i[(i % 3) != 1]


def _run_threads(targets):
    errors = []

    def wrap(fn):
        try:
            fn()
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=wrap, args=(fn,)) for fn in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not [t for t in threads if t.is_alive()], "a thread hung"
    assert not errors, errors


def test_several_savers_in_threads(tmp_path, figures):
    steps, results = 6000, {}

    def one(k):
        collector = jaxsave.HDF5Collector(tmp_path / f"s{k}.h5") if k % 2 else jaxsave.MemoryCollector()
        saver = jaxsave.save(collector, block_size=64)
        state = _chain_loop(saver, saver.init({"c": jnp.int32(0), "i": jnp.int32(0)}, None), k, steps)
        out = saver.postprocess(state, None)["samples"]
        results[k] = out if out is not None else jaxsave.load_samples(tmp_path / f"s{k}.h5", chain=0)

    _run_threads([lambda k=k: one(k) for k in range(4)])
    for k in range(4):
        np.testing.assert_array_equal(results[k]["i"], _expect(k, steps))
        assert (np.asarray(results[k]["c"]) == k).all()
    figures(
        "load",
        "4 savers in 4 threads (HDF5 and memory)",
        samples=4 * len(_expect(0, steps)),
        lost_or_reordered=0,
    )


@pytest.mark.parametrize("collector", ["hdf5", "memory"])
def test_one_collector_fed_from_several_threads(tmp_path, collector, figures):
    """Chains registered and run from different threads, all into one collector."""
    steps, threads = 4000, 6
    coll = jaxsave.HDF5Collector(tmp_path / "shared.h5") if collector == "hdf5" else jaxsave.MemoryCollector()
    saver = jaxsave.save(coll, block_size=32)
    chains = {}

    def one(k):
        state = saver.init({"c": jnp.int32(0), "i": jnp.int32(0)}, None)  # registered from this thread
        cid = int(state.chain_id)
        chains[cid] = _chain_loop(saver, state, cid, steps, chunk=400)

    _run_threads([lambda k=k: one(k) for k in range(threads)])
    states = [chains[c] for c in sorted(chains)]
    outs = [saver.postprocess(s, None) for s in states]
    assert sorted(chains) == list(range(threads))
    for c, out in zip(sorted(chains), outs):
        samples = (
            out["samples"] if collector == "memory" else jaxsave.load_samples(tmp_path / "shared.h5", chain=c)
        )
        np.testing.assert_array_equal(samples["i"], _expect(c, steps))
        assert (np.asarray(samples["c"]) == c).all()
    figures(
        "load",
        f"one {collector} collector, {threads} threads' chains",
        samples=threads * len(_expect(0, steps)),
        lost_or_reordered=0,
    )
