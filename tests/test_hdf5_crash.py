"""A sampler process killed with SIGKILL leaves a file that opens, with consistent counts and data."""

import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import xarray as xr

import jaxsave

ROOT = pathlib.Path(__file__).resolve().parents[1]

WRITER = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp, jaxsave

    path, known = sys.argv[1], sys.argv[2] == "known"
    print("start", flush=True)
    init, save, post = jaxsave.save(jaxsave.HDF5Collector(path), block_size=16)
    info = jaxsave.static_information(10**6 if known else None)
    state = init({"i": jnp.zeros(3, jnp.int32), "w": jnp.zeros((3, 2048))}, None, info, chains=3)

    def chain(state, c):
        def step(s, i):
            v = c * 1_000_000 + s.step  # the chain's draw number, as every step is kept
            return save(s, True, {"i": v, "w": jnp.full(2048, v, jnp.float32)})
        return jax.lax.scan(step, state, jnp.arange(64))[0]

    run = jax.jit(jax.vmap(chain))
    chains = jnp.arange(3)
    state = run(state, chains)
    print("ready", flush=True)
    while True:
        state = run(state, chains)
""")


def wait_for_counts(path, draws, deadline):
    """Poll the live file until every chain counts ``draws`` (a loaded machine can lag seconds)."""
    while time.monotonic() < deadline:
        try:
            counts = jaxsave.file_info(path).sample_counts
            if counts.size and (counts >= draws).all():
                return
        except (OSError, jaxsave.JaxsaveError):
            pass  # not created yet, or being swapped
        time.sleep(0.05)
    raise AssertionError(f"the writer did not store {draws} draws per chain in time")


def kill_writer(tmp_path, delay, known=False):
    """Start the writer, SIGKILL it ``delay`` seconds after it is ready (None: as soon as it starts)."""
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    path = tmp_path / "s.h5"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(path), "known" if known else "unknown"],
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "start"
        if delay is not None:
            assert proc.stdout.readline().strip() == "ready"
            if delay >= 0.3:  # the first run's blocks are on their way: wait until they are counted
                wait_for_counts(path, 64, deadline=time.monotonic() + 120)
            time.sleep(delay)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return path


def check(path):
    """The file opens; every counted draw holds the right values; returns the counts."""
    info = jaxsave.file_info(path)
    counts = info.sample_counts
    if not info.variables:
        return counts
    samples = jaxsave.load_samples(path)
    for c, n in enumerate(counts.tolist()):
        want = c * 1_000_000 + np.arange(n)
        np.testing.assert_array_equal(samples["i"][c, :n], want)
        np.testing.assert_array_equal(
            samples["w"][c, :n], np.repeat(want[:, None], 2048, 1).astype(np.float32)
        )
    if counts.size:
        tail = jaxsave.load_samples(path, chain=0, draws=slice(-3, None))["i"]
        assert tail.tolist() == list(range(max(0, counts[0] - 3), counts[0]))
    return counts


@pytest.mark.parametrize(
    ("delay", "known"), [(None, False), (0.0, False), (0.3, False), (1.0, False), (1.0, True)]
)
def test_sigkill_leaves_a_consistent_file(tmp_path, delay, known):
    path = kill_writer(tmp_path, delay, known)
    if delay is None and not path.exists():
        return  # killed before the file was created: nothing to open
    counts = check(path)
    assert (counts % 16 == 0).all()  # whole blocks only
    if delay is not None and delay >= 0.3:
        assert counts.size == 3 and (counts >= 64).all()  # the first run's blocks were all written
    # other HDF5 readers refuse a file still marked open (unless killed between two
    # structural changes, when it is closed); recover() clears the mark
    was_open = jaxsave.file_info(path).open_for_writing
    assert jaxsave.recover(path) == was_open
    assert not jaxsave.file_info(path).open_for_writing
    if counts.size:
        with xr.open_dataset(path, group="posterior", engine="h5netcdf") as ds:
            n = int(counts.min())
            np.testing.assert_array_equal(
                ds["i"].values[:, :n], np.arange(3)[:, None] * 1_000_000 + np.arange(n)
            )
            # every draw numbered, the preallocated ones past the counts too
            np.testing.assert_array_equal(ds["draw"].values, np.arange(ds.sizes["draw"]))
        assert (check(path) == counts).all()


@pytest.mark.slow
@pytest.mark.parametrize("known", [False, True])
def test_sigkill_at_many_moments(tmp_path, known):
    rng = np.random.default_rng(0)
    for k, delay in enumerate(rng.uniform(0, 1.5, size=12)):
        sub = tmp_path / str(k)
        sub.mkdir()
        counts = check(kill_writer(sub, float(delay), known))
        assert (counts % 16 == 0).all()


REGISTERED = textwrap.dedent("""
    import os, signal, sys
    import jax.numpy as jnp, jaxsave

    path, layout = sys.argv[1], sys.argv[2]
    init, save, post = jaxsave.save(jaxsave.HDF5Collector(path, layout=layout), block_size=16)
    state = init({"i": jnp.zeros((), jnp.int32), "w": jnp.zeros(4)}, None, jaxsave.static_information(64))
    os.kill(os.getpid(), signal.SIGKILL)  # chain registered, no block written
""")


@pytest.mark.parametrize("layout", ["posterior", "chains"])
def test_a_writer_killed_before_its_first_block_is_taken_over(tmp_path, layout):
    # its structure is written and its datasets are not (they come with the first block):
    # mode="a" must continue it, not call it damaged
    script, path = tmp_path / "registered.py", tmp_path / "s.h5"
    script.write_text(REGISTERED)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, str(script), str(path), layout], env=env, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    info = jaxsave.file_info(path)
    assert [v.name for v in info.variables] == ["i", "w"] and not info.sample_counts.any()
    collector = jaxsave.HDF5Collector(path, mode="a", layout=layout)
    init, save, post = jaxsave.save(collector, block_size=4)
    state = init({"i": jnp.zeros((), jnp.int32), "w": jnp.zeros(4)}, None, jaxsave.static_information(8))

    def step(s, i):
        return save(s, True, {"i": i, "w": jnp.full(4, i, jnp.float32)})

    post(jax.lax.scan(step, state, jnp.arange(8))[0])
    collector.close()
    assert jaxsave.load_samples(path)["i"].tolist() == [list(range(8))]


def _written(path, layout="posterior"):
    """A finished ``swmr=False`` file of leaves ``i`` and ``w``, 4 draws of one chain."""
    collector = jaxsave.HDF5Collector(path, swmr=False, layout=layout)
    init, save, post = jaxsave.save(collector, block_size=4)
    state = init({"i": jnp.zeros((), jnp.int32), "w": jnp.zeros(4)}, None, jaxsave.static_information(4))
    post(jax.lax.scan(lambda s, i: save(s, True, {"i": i, "w": jnp.zeros(4)}), state, jnp.arange(4))[0])
    collector.close()
    return path


def test_a_file_missing_some_of_its_leaves_datasets_is_refused(tmp_path):
    # datasets are created together: one left without the others is damage, named
    path = _written(tmp_path / "s.h5")
    with h5py.File(path, "r+") as f:
        del f["posterior/w"]
    with pytest.raises(jaxsave.FileFormatError, match="lacks the dataset 'posterior/w'"):
        jaxsave.HDF5Collector(path, mode="a", swmr=False)


@pytest.mark.parametrize("left", ["posterior/w", "posterior/draw"])
def test_no_datasets_but_something_in_their_place_is_refused(tmp_path, left):
    # a group where a leaf goes, or a scale without its leaves: damage, not a writer killed
    # before its first block (continuing it failed in h5py after changing the file)
    path = _written(tmp_path / "s.h5")
    with h5py.File(path, "r+") as f:
        f.attrs["sample_counts"] = np.zeros(1, np.int64)
        del f["posterior"]
        f.create_group(left) if left.endswith("w") else f.create_dataset(left, data=np.arange(4))
    before = path.read_bytes()
    with pytest.raises(jaxsave.FileFormatError, match="lacks the dataset 'posterior/i'"):
        jaxsave.HDF5Collector(path, mode="a", swmr=False)
    assert path.read_bytes() == before


@pytest.mark.parametrize("extra", ["chain~1", "chain~7", "chain~x"])
def test_a_chain_group_the_counts_do_not_cover_is_refused(tmp_path, extra):
    # a chain registered by the next writer would take over the group, unchecked
    path = _written(tmp_path / "s.h5", layout="chains")
    with h5py.File(path, "r+") as f:
        f.copy("chain~0", extra)
    before = path.read_bytes()
    with pytest.raises(
        jaxsave.FileFormatError, match=f"has the group '{extra}', but its sample counts cover 1"
    ):
        jaxsave.HDF5Collector(path, mode="a", swmr=False, layout="chains")
    assert path.read_bytes() == before
