"""Zarr stores on object storage: a real S3-compatible server (moto's server mode) on loopback.

The server runs in its own process for the session (``s3_server`` in conftest.py,
tests/_s3.py); every test gets a new bucket and reaches it through s3fs, as a user
would reach AWS S3 or any S3-compatible store.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from _zarr_sampler import CHAINS, ROUND, STATS, initial, kept, reference, run, same_bits, sample_template

import jaxsave

zarr = pytest.importorskip("zarr")
STEPS = 6 * ROUND


def fsspec_store(bucket, name: str, read_only: bool = True):
    """A ``zarr.storage.FsspecStore`` for ``s3://<bucket>/<name>`` on the loopback server."""
    return zarr.storage.FsspecStore.from_url(
        f"{bucket.url}/{name}", storage_options=bucket.storage_options, read_only=read_only
    )


def test_loopback_server_round_trips_a_zarr_array(s3_bucket):
    """The harness itself: zarr writes chunks and metadata through s3fs to the server and reads them back."""
    url = f"{s3_bucket.url}/probe.zarr"
    group = zarr.open_group(url, mode="w", storage_options=s3_bucket.storage_options)
    array = group.create_array(
        "x", shape=(4, 100), chunks=(1, 10), dtype="f4", dimension_names=("chain", "draw")
    )
    array[:2, :50] = np.arange(100, dtype="f4").reshape(2, 50)
    group.attrs["n"] = 5
    keys = s3_bucket.keys()
    assert "probe.zarr/zarr.json" in keys and "probe.zarr/x/zarr.json" in keys
    assert sorted(k for k in keys if "/c/" in k) == [
        f"probe.zarr/x/c/{c}/{d}" for c in (0, 1) for d in range(5)
    ]
    again = zarr.open_group(url, mode="r", storage_options=s3_bucket.storage_options)
    np.testing.assert_array_equal(again["x"][:2, :50], np.arange(100, dtype="f4").reshape(2, 50))
    assert not again["x"][2:].any() and again.attrs["n"] == 5  # chunks never written read as the fill value


def test_loopback_server_stops(tmp_path):
    """The server process ends when the fixture closes it."""
    pytest.importorskip("moto.server")
    from _s3 import S3Server

    with S3Server() as server:
        assert server.bucket().fs().ls("") is not None
        proc = server.proc
    assert proc.poll() is not None


def test_stream_a_jit_loop_to_s3(s3_bucket):
    """A jit-compiled vmapped loop streams to ``s3://bucket/run.zarr``: every sample bit for bit as
    MemoryCollector gets it, read back by load_samples, file_info, xarray and ArviZ."""
    url = f"{s3_bucket.url}/run.zarr"
    collector = jaxsave.ZarrCollector(url, sample_stats=STATS, storage_options=s3_bucket.storage_options)
    saver = jaxsave.save(collector, block_size=4)
    state = saver.init(sample_template(), None, chains=CHAINS)
    state, _ = run(saver, state, initial(), 0, STEPS)
    result = saver.postprocess(state, None)
    assert result["sample_count"].tolist() == [kept(STEPS)] * CHAINS
    want = reference(STEPS)

    keys = s3_bucket.keys("run.zarr")
    assert {
        "run.zarr/zarr.json",
        "run.zarr/posterior/x/zarr.json",
        "run.zarr/sample_stats/n/zarr.json",
    } <= set(keys)
    per_key = zarr.open_array(fsspec_store(s3_bucket, "run.zarr/sample_counts"), mode="r").chunks[0]
    assert [k for k in keys if k.startswith("run.zarr/sample_counts/c/")] == [
        f"run.zarr/sample_counts/c/{c}" for c in range(-(-CHAINS // per_key))
    ]  # one count object per chunk of chains (one writer: all its chains in one)

    store = fsspec_store(s3_bucket, "run.zarr")
    got = jaxsave.load_samples(store)
    for name in ("x", "lp", "n"):
        assert same_bits(got[name], want[name]), name
    assert same_bits(jaxsave.load_samples(store, chain=2, draws=slice(3, 9))["x"], want["x"][2, 3:9])
    info = jaxsave.file_info(store)
    assert info.chains == CHAINS and info.sample_counts.tolist() == [kept(STEPS)] * CHAINS

    import xarray as xr

    tree = xr.open_datatree(url, engine="zarr", storage_options=s3_bucket.storage_options)
    assert dict(tree["posterior"]["x"].sizes) == {"chain": CHAINS, "draw": kept(STEPS), "x_dim_0": 3}
    assert same_bits(tree["posterior"]["x"].values, want["x"])
    assert same_bits(tree["sample_stats"]["n"].values, want["n"])

    import arviz as az

    if int(az.__version__.split(".")[0]) >= 1:
        idata = az.from_zarr(url, storage_options=s3_bucket.storage_options)
    else:  # ArviZ 0.x reads zarr 2 only; xarray's DataTree converts
        idata = az.InferenceData.from_datatree(tree)
    assert same_bits(idata["posterior"]["x"].values, want["x"])
    assert len(az.summary(idata, var_names=["x"])) == 3
    ours = jaxsave.to_inference_data(store)
    assert same_bits(ours["posterior"]["x"].values, want["x"])
    assert same_bits(ours["sample_stats"]["lp"].values, want["lp"])


def test_live_reading_from_s3(s3_bucket):
    """While a run writes to S3, a reader sees counted draws only, each exactly as the run saved it."""
    url = f"{s3_bucket.url}/live.zarr"
    collector = jaxsave.ZarrCollector(
        url, sample_stats=STATS, storage_options=s3_bucket.storage_options, flush_interval=0
    )
    saver = jaxsave.save(collector, block_size=2)
    state = saver.init(
        sample_template(), None, jaxsave.static_information(samples_collected=kept(STEPS)), chains=CHAINS
    )
    want, seen = reference(STEPS), []

    def look(r):
        if r % 2 == 1:
            store = fsspec_store(s3_bucket, "live.zarr")
            deadline = time.monotonic() + 60  # the sampler waits here: the writer catches up
            while True:
                counts = jaxsave.file_info(store).sample_counts.tolist()
                if (counts and min(counts) > 0) or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            if counts:  # else no block was written yet
                x = jaxsave.load_samples(store)["x"]
                for c, n in enumerate(counts):
                    assert same_bits(x[c, :n], want["x"][c, :n]), (c, n)
            seen.append(counts or [0] * CHAINS)

    state, _ = run(saver, state, initial(), 0, STEPS, on_round=look)
    saver.postprocess(state, None)
    got = jaxsave.load_samples(fsspec_store(s3_bucket, "live.zarr"))
    assert same_bits(got["x"], want["x"])
    assert any(0 < min(c) for c in seen), seen  # draws were visible before the end
    flat = [max(c) for c in seen]
    assert flat == sorted(flat) and flat[-1] <= kept(STEPS)


def test_every_reader_takes_storage_options(s3_bucket, tmp_path, capsys):
    """``s3://`` URL plus ``storage_options`` (the loopback server's endpoint and keys, which s3fs
    needs to reach it at all): load_samples, file_info, to_inference_data, open_live, recover,
    resume and ``jaxsave inspect --storage-options`` read the store a checkpointed run wrote."""
    import json

    from jaxsave.__main__ import main

    url, options = f"{s3_bucket.url}/opts.zarr", s3_bucket.storage_options
    collector = jaxsave.ZarrCollector(url, sample_stats=STATS, storage_options=options, checkpoint_interval=0)
    saver = jaxsave.save(collector, block_size=4, checkpoint_every=ROUND)
    state = saver.init(sample_template(), initial(), chains=CHAINS)
    state, _ = run(saver, state, initial(), 0, STEPS)
    saver.postprocess(state, None)
    want = reference(STEPS)

    got = jaxsave.load_samples(url, storage_options=options)
    assert all(same_bits(got[k], want[k]) for k in ("x", "lp", "n"))
    part = jaxsave.load_samples(url, chain=1, draws=slice(2, 7), storage_options=options)
    assert same_bits(part["x"], want["x"][1, 2:7])
    info = jaxsave.file_info(url, storage_options=options)
    assert info.sample_counts.tolist() == [kept(STEPS)] * CHAINS
    data = jaxsave.to_inference_data(url, storage_options=options)
    assert same_bits(data["posterior"]["x"].values, want["x"])
    live = jaxsave.open_live(url, storage_options=options)
    assert (
        same_bits(live.refresh(chain=3)["x"], want["x"][3])
        and live.sample_counts.tolist() == info.sample_counts.tolist()
    )
    assert jaxsave.recover(url, storage_options=options) is False
    ckpt = jaxsave.resume(url, storage_options=options)
    assert ckpt.step.tolist() == [STEPS] * CHAINS and ckpt.chain_ids.tolist() == list(range(CHAINS))

    assert main(["inspect", url, "--storage-options", json.dumps(options)]) == 0
    out = capsys.readouterr().out
    assert f"chains:   {CHAINS}" in out and f"samples:  {[kept(STEPS)] * CHAINS}" in out

    h5 = str(tmp_path / "run.h5")
    init, save, post = jaxsave.save(jaxsave.HDF5Collector(h5))
    post(save(init({"w": np.zeros(2, np.float32)}), True, {"w": np.ones(2, np.float32)})[0], None)
    for read in (
        lambda: jaxsave.load_samples(h5, storage_options=options),
        lambda: jaxsave.file_info(h5, storage_options=options),
        lambda: jaxsave.to_inference_data(h5, storage_options=options),
        lambda: jaxsave.open_live(h5, storage_options=options),
        lambda: jaxsave.recover(h5, storage_options=options),
        lambda: jaxsave.resume(h5, storage_options=options),
    ):
        with pytest.raises(TypeError, match="HDF5 file, which takes none"):
            read()
    with pytest.raises(TypeError, match="must be a dict"):
        jaxsave.load_samples(url, storage_options="endpoint_url=x")
    assert main(["inspect", h5, "--storage-options", json.dumps(options)]) == 2
    assert "HDF5 file, which takes none" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["inspect", url, "--storage-options", "[1, 2]"])
    assert "must be a JSON object" in capsys.readouterr().err
